"""The embedded Gemma 3 270M (Q4_K_M GGUF from four PyPI wheels) loaded by transformers from its GGUF
(gguf_file=) against jaxprobe's conversion of the same file, on a few IMDB reviews, one of them
longer than the model's sliding window of 512 tokens."""

import functools

import pytest
import torch

import jaxprobe
from jaxprobe.source_paths import gemma3_gguf_path
from jaxprobe.data import load_split
from jaxprobe.testing import assert_near_hf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_gemma3():
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers parses the file's metadata twice (config, then weights), and a conversion in this
    # process a third time; parsed once here (about 12 s each: 262,144 token strings), read-only.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=1)(gguf.GGUFReader))
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        lm = jaxprobe.load_model("gemma3-270m")
    return tok, model, lm


def test_every_layer_matches_transformers_on_imdb(hf_gemma3):
    tok, model, lm = hf_gemma3
    reviews = load_split("imdb", "test").shuffle(seed=0).select(range(6))["text"]
    long = " ".join(" ".join(reviews[3:]).split(" ")[:480])  # past the window of 512 tokens, not far
    texts = [" ".join(r.split(" ")[-100:]) for r in reviews[:3]] + [long]
    ids = lm.tokenize(texts)
    assert ids == tok(texts)["input_ids"] and ids[0][0] == tok.bos_token_id
    assert len(ids[-1]) > lm.config.sliding_window  # the local layers' window is in play
    res = lm.run(texts, all_logits=True, batch_size=4)
    assert res["activations"].shape[1] == 19  # hidden_states[0] is Gemma's scaled embedding, as ours
    for i, row in enumerate(ids):
        assert_near_hf(res, i, model, row)
