"""The one probing test on the real SmolLM2-135M: untruncated 5-shot prompts of two SST-2
sentences (short, so the test stays fast) into stores, with and without the shared-prefix cache
(same numbers, same layout)."""

import numpy as np
import pytest

import jaxprobe
from jaxprobe.extract import ExtractConfig, extract

pytestmark = pytest.mark.slow


def test_smollm2_untruncated_5shot_store_with_and_without_prefix_cache(tmp_path):
    lm = jaxprobe.load_model("smollm2-135m")
    stores = {}
    for mode in ("on", "off"):
        cfg = ExtractConfig(out=str(tmp_path / mode), dataset="sst2", split="validation", n=2,
                            batch_size=2,
                            template="vector-5shot-untruncated", prefix_cache=mode, progress=False)
        stores[mode] = jaxprobe.open_activations(extract(cfg, lm=lm, log=lambda _: None))
    on, off = stores["on"], stores["off"]
    assert on.activations.shape == (2, 31, 576)
    assert on.manifest["model"]["name"] == "smollm2-135m"
    assert on.manifest["settings"]["prefix_tokens"] > 50  # instruction + 5 demonstrations
    assert on.prompts()[0].startswith("Classify the sentiment of the text.\nText: ")
    assert on.prompts()[0].endswith(" The sentiment is")
    # float32 rounding relative to the residual stream's scale (values reach ~100)
    scale = np.abs(off.activations).max()
    assert np.abs(on.activations - off.activations).max() <= 1e-5 * scale
    assert not np.allclose(on.activations[0], on.activations[1])
