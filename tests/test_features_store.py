"""Feature store: resume after a crash, cache hits and misses by identity, and importing outside features."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prefill_router.errors import ConfigError, DataError
from prefill_router.features import FeatureSet, extract_to_store, import_features, load_encoder

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "what", "is", "capital", "of", "france",
         "paris", "rome", "question", "answer"]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 30)))) for _ in range(n)]


PROMPTS = make_prompts(24)


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    return load_encoder(str(tiny_encoder_dir))


@pytest.fixture(scope="module")
def expected(encoder):
    return encoder.encode(PROMPTS)


def count_forwards(monkeypatch, encoder, fail_after: int | None = None) -> list[int]:
    """Record the batch sizes the encoder runs; optionally raise (a simulated crash) after some batches."""
    sizes: list[int] = []
    original = type(encoder)._forward

    def forward(self, batch, poolings, layer_ids):
        if fail_after is not None and len(sizes) == fail_after:
            raise KeyboardInterrupt("simulated crash")
        sizes.append(len(batch))
        return original(self, batch, poolings, layer_ids)

    monkeypatch.setattr(type(encoder), "_forward", forward)
    return sizes


def test_store_holds_the_encoder_output_and_is_a_cache_hit(encoder, expected, tmp_path, monkeypatch):
    fs = extract_to_store(PROMPTS, encoder, tmp_path / "store", dtype="float32", progress=False)
    assert fs.complete and fs.n == len(PROMPTS)
    assert fs.hidden_states == {"mean": [0, 1, 2], "last": [0, 1, 2]}
    assert fs.identity == encoder.identity()
    np.testing.assert_allclose(fs.get("mean"), expected["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fs.get("last", layers=[2, 0]), expected["last"][:, [2, 0]], rtol=1e-5, atol=1e-6)
    assert (fs.tokens == encoder.count_tokens(PROMPTS)).all()
    with pytest.raises(ConfigError, match="hidden state"):
        fs.get("mean", layers=[5])
    # Same prompts, same spec (or a subset of what is stored): nothing is computed again.
    sizes = count_forwards(monkeypatch, encoder)
    again = extract_to_store(PROMPTS, encoder, tmp_path / "store", progress=False)
    extract_to_store(PROMPTS, encoder, tmp_path / "store", poolings=["last"], layers=[1], progress=False)
    assert sizes == []
    np.testing.assert_array_equal(again.get("mean"), fs.get("mean"))


def test_float16_store_is_close_to_float32(encoder, expected, tmp_path):
    fs = extract_to_store(PROMPTS, encoder, tmp_path / "half", progress=False)
    assert fs.dtype == "float16"
    assert np.load(tmp_path / "half" / "mean.npy", mmap_mode="r").dtype == np.float16
    np.testing.assert_allclose(fs.get("mean"), expected["mean"], rtol=2e-3, atol=2e-3)


def test_resume_after_a_crash_recomputes_only_missing_rows(encoder, expected, tmp_path, monkeypatch):
    path = tmp_path / "store"
    sizes = count_forwards(monkeypatch, encoder, fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        extract_to_store(PROMPTS, encoder, path, dtype="float32", batch_tokens=64, progress=False)
    partial = FeatureSet.open(path)
    done = partial.done
    assert done.sum() == sum(sizes) and 0 < done.sum() < len(PROMPTS)
    np.testing.assert_allclose(partial.get("last", rows=done), expected["last"][done], rtol=1e-5, atol=1e-6)
    assert not partial.get("mean", rows=~done).any()  # unfinished rows are still empty

    monkeypatch.undo()  # the forward counter; the cache variables stay in the session's temporary folder
    resumed_sizes = count_forwards(monkeypatch, encoder)
    fs = extract_to_store(PROMPTS, encoder, path, batch_tokens=64, progress=False)
    assert sum(resumed_sizes) == len(PROMPTS) - done.sum()  # nothing done before was recomputed
    assert fs.complete  # no holes
    np.testing.assert_allclose(fs.get("mean"), expected["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fs.get("last"), expected["last"], rtol=1e-5, atol=1e-6)


def test_identity_changes_miss_the_cache(encoder, tiny_encoder_dir, tmp_path, monkeypatch):
    from conftest import make_tiny_encoder

    path = tmp_path / "store"
    extract_to_store(PROMPTS, encoder, path, layers=[0, 2], progress=False)
    raw = load_encoder(str(tiny_encoder_dir), template="raw")
    with pytest.raises(ConfigError, match="template"):
        extract_to_store(PROMPTS, raw, path, progress=False)
    with pytest.raises(ConfigError, match=r"lacks hidden state\(s\) \[1\]"):
        extract_to_store(PROMPTS, encoder, path, layers=[0, 1], progress=False)
    other = load_encoder(str(make_tiny_encoder(tmp_path / "other", seed=1)))
    with pytest.raises(ConfigError, match="files"):
        extract_to_store(PROMPTS, other, path, progress=False)
    with pytest.raises(ConfigError, match="row 3"):
        extract_to_store(PROMPTS[:3] + ["something else"] + PROMPTS[4:], encoder, path, progress=False)
    # overwrite=True starts a fresh store for the new identity, with the old store's layout.
    sizes = count_forwards(monkeypatch, raw)
    fs = extract_to_store(PROMPTS, raw, path, overwrite=True, progress=False)
    assert sum(sizes) == len(PROMPTS)
    assert fs.identity["template"] == "raw" and fs.complete
    assert fs.hidden_states == {"mean": [0, 2], "last": [0, 2]}
    np.testing.assert_allclose(fs.get("last"), raw.encode(PROMPTS, layers=[0, 2])["last"], rtol=2e-3, atol=2e-3)


def test_a_non_store_folder_is_never_overwritten(encoder, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a feature store"):
        extract_to_store(PROMPTS, encoder, tmp_path / "mine", overwrite=True, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="no manifest"):
        FeatureSet.open(tmp_path / "mine")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt manifest"):
        FeatureSet.open(tmp_path / "bad")


def test_import_npy_with_manifest_then_fill_missing_rows(encoder, expected, tmp_path, monkeypatch):
    n, h = len(PROMPTS), encoder.hidden_size
    rng = np.random.default_rng(1)
    src = tmp_path / "elsewhere"
    src.mkdir()
    # Float "mean" at hidden states [0, 2]; int8 "last" at [2] with per-dimension affine quantization.
    mean = rng.normal(size=(n, 2, h)).astype(np.float32)
    q = rng.integers(-128, 128, size=(n, 1, h)).astype(np.int8)
    offset = rng.normal(size=(1, h)).astype(np.float32)
    scale = rng.uniform(0.01, 0.1, size=(1, h)).astype(np.float32)
    done = np.zeros(n, dtype=bool)
    done[::3] = True
    for name, array in [("mean.npy", mean), ("last_q.npy", q), ("off.npy", offset), ("sc.npy", scale),
                        ("done.npy", done)]:
        np.save(src / name, array)
    (src / "features.json").write_text(json.dumps({
        "identity": encoder.identity(),
        "poolings": {"mean": {"file": "mean.npy", "hidden_states": [0, 2]},
                     "last": {"file": "last_q.npy", "hidden_states": [2], "offset": "off.npy", "scale": "sc.npy"}},
        "done": "done.npy"}))

    fs = import_features(src, tmp_path / "store", prompts=PROMPTS, dtype="float32")
    assert (fs.done == done).all()
    assert fs.hidden_states == {"mean": [0, 2], "last": [2]}
    np.testing.assert_allclose(fs.get("mean", rows=done), mean[done], rtol=1e-6)
    by_hand = offset[None] + scale[None] * (q.astype(np.float32) + 128.0)
    np.testing.assert_allclose(fs.get("last", rows=done), by_hand[done], rtol=1e-6, atol=1e-6)

    sizes = count_forwards(monkeypatch, encoder)
    filled = extract_to_store(PROMPTS, encoder, tmp_path / "store", progress=False)
    assert sum(sizes) == n - done.sum()
    assert filled.complete
    # Imported rows are kept as imported; the missing ones are the encoder's own features.
    np.testing.assert_allclose(filled.get("mean", rows=done), mean[done], rtol=1e-6)
    np.testing.assert_allclose(filled.get("mean", rows=~done), expected["mean"][~done][:, [0, 2]],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(filled.get("last", rows=~done), expected["last"][~done][:, [2]],
                               rtol=1e-5, atol=1e-6)


def test_import_errors_name_the_field(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "mean.npy", np.zeros((4, 2, 8), dtype=np.float32))
    (src / "features.json").write_text(json.dumps({"identity": {}, "poolings": {
        "mean": {"file": "mean.npy", "hidden_states": [0, 1, 2]}}}))
    with pytest.raises(DataError, match="poolings.mean.hidden_states"):
        import_features(src, tmp_path / "out")
    (src / "features.json").write_text(json.dumps({"poolings": {}}))
    with pytest.raises(DataError, match="identity"):
        import_features(src, tmp_path / "out")


def test_rows_of_maps_prompts_by_hash_and_marks_missing_ones_only_when_asked(tmp_path):
    from prefill_router.data.prompt import prompt_hashes
    from prefill_router.features.store import FeatureStore

    stored = ["a", "b", "a", "c"]
    FeatureStore.create(tmp_path / "s", identity={"model": "x"}, hidden_states={"mean": [0]}, rows=4,
                        hidden_size=2, prompt_hashes=prompt_hashes(stored)).close()
    fs = FeatureSet.open(tmp_path / "s")
    assert fs.rows_of(["c", "a", "a"]).tolist() == [3, 0, 2]  # the k-th copy maps to the k-th stored copy
    with pytest.raises(ConfigError, match="lacks 1 of the 2 prompts"):
        fs.rows_of(["b", "zzz"])
    assert fs.rows_of(["b", "zzz"], missing_ok=True).tolist() == [1, -1]
