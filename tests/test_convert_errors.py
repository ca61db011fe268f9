"""Conversion refuses, in one line naming the problem, what it cannot convert faithfully."""

import json
import subprocess
import sys

import pytest
from safetensors.numpy import load_file, save_file

from conftest import make_hf_model
from jaxprobe.convert import convert
from jaxprobe.errors import UserError


@pytest.fixture()
def hf_folder(tmp_path):
    make_hf_model(tmp_path / "hf", num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    return tmp_path / "hf"


def _edit_tensors(folder, edit):
    f = folder / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unknown_key_is_refused(hf_folder, tmp_path):
    _edit_tensors(hf_folder, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": t["model.norm.weight"]}))
    with pytest.raises(UserError, match=r"unknown tensor 'model.layers.0.self_attn.q_proj.bias'"):
        convert(hf_folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "config.json").exists()


def test_missing_key_is_refused(hf_folder, tmp_path):
    _edit_tensors(hf_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError, match=r"missing tensor model.layers.1.mlp.up_proj.weight in "):
        convert(hf_folder, tmp_path / "out", progress=False)


def test_wrong_shape_is_refused(hf_folder, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :-1].copy()
    _edit_tensors(hf_folder, shrink)
    with pytest.raises(UserError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \(64, 95\) but the config implies \(64, 96\)"):
        convert(hf_folder, tmp_path / "out", progress=False)


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("sliding_window", 4096),
                                         ("hidden_act", "gelu"), ("some_new_field", 1)])
def test_unsupported_config_field_is_refused(hf_folder, tmp_path, field, value):
    _edit_config(hf_folder, **{field: value})
    with pytest.raises(UserError, match=f"unsupported config field {field}="):
        convert(hf_folder, tmp_path / "out", progress=False)


def test_cli_prints_one_line_not_a_traceback(hf_folder, tmp_path):
    _edit_config(hf_folder, attention_bias=True)
    r = subprocess.run([sys.executable, "-m", "jaxprobe.cli", "convert", str(hf_folder), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("jaxprobe convert: error: ")
    r = subprocess.run([sys.executable, "-m", "jaxprobe.cli", "convert", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "model source not found" in r.stderr


def test_info_reports_the_checkpoint(hf_folder, tmp_path, capsys):
    from jaxprobe.cli import main

    convert(hf_folder, tmp_path / "ckpt", progress=False)
    assert main(["info", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "n_kv_heads   2" in out and "parameters:" in out
    with pytest.raises(UserError, match="already holds a checkpoint"):
        convert(hf_folder, tmp_path / "ckpt", progress=False)


def test_checkpoint_in_an_older_parameter_layout(hf_folder, tmp_path, monkeypatch, capsys):
    """A checkpoint from before the fused layout is refused by name; an automatic conversion of a
    source (what load_model keeps in checkpoints/ or the cache) is simply made again."""
    import numpy as np

    import jaxprobe
    from jaxprobe import runtime
    from jaxprobe.checkpoint import PARAM_LAYOUT, StaleCheckpoint

    auto = tmp_path / "auto"
    monkeypatch.setattr(runtime, "_converted_path", lambda src, dtype: auto)
    fresh = jaxprobe.load_model(hf_folder).activations(["a charming film"])
    source = json.loads((auto / "source.json").read_text())
    assert source["param_layout"] == PARAM_LAYOUT
    del source["param_layout"]  # as written before the layout was recorded
    (auto / "source.json").write_text(json.dumps(source))
    with pytest.raises(StaleCheckpoint, match=rf"holds parameter layout 1, .* convert again \(jaxprobe convert {hf_folder}"):
        jaxprobe.load_model(auto)
    capsys.readouterr()
    again = jaxprobe.load_model(hf_folder).activations(["a charming film"])
    assert "converting" in capsys.readouterr().out
    np.testing.assert_array_equal(again, fresh)
