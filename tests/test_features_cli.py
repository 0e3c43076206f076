"""`prefill-router extract` end to end on a small routing data file and the tiny random encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prefill_router.cli import main
from prefill_router.features import FeatureSet, import_reference, load_encoder


@pytest.fixture
def data_file(tmp_path):
    rows = [{"prompt_id": f"q{i}", "prompt": f"what is the capital of france? option {i} " * (1 + i % 4),
             "model-a": i % 2, "model-b": 1} for i in range(9)]
    path = tmp_path / "routing.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, [r["prompt"] for r in rows]


def test_extract_command_writes_a_store_then_hits_the_cache(tiny_encoder_dir, data_file, tmp_path, capsys):
    path, prompts = data_file
    out = tmp_path / "store"
    argv = ["extract", "--data", str(path), "--encoder", str(tiny_encoder_dir), "--layers", "0,2",
            "--poolings", "last", "--dtype", "float32", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    fs = FeatureSet.open(out)
    assert fs.complete and fs.hidden_states == {"last": [0, 2]}
    expected = load_encoder(str(tiny_encoder_dir)).encode(prompts, poolings=["last"], layers=[0, 2])
    np.testing.assert_allclose(fs.get("last"), expected["last"], rtol=1e-5, atol=1e-6)
    stamp = (out / "done.npy").stat().st_mtime_ns
    assert main(argv) == 0  # cache hit: nothing rewritten
    assert (out / "done.npy").stat().st_mtime_ns == stamp
    assert "9/9 rows done" in capsys.readouterr().out


def test_extract_command_refuses_a_store_of_another_template(tiny_encoder_dir, data_file, tmp_path, capsys):
    path, _ = data_file
    out = tmp_path / "store"
    base = ["extract", "--data", str(path), "--encoder", str(tiny_encoder_dir), "--no-progress",
            "--limit", "4", "--out", str(out)]
    assert main(base) == 0
    assert FeatureSet.open(out).n == 4
    assert main(base + ["--template", "raw"]) == 2
    assert "template" in capsys.readouterr().err
    assert main(base + ["--template", "raw", "--overwrite"]) == 0
    assert FeatureSet.open(out).identity["template"] == "raw"
    assert main(["extract", "--data", str(path), "--encoder", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "unknown encoder" in capsys.readouterr().err


def test_reference_layout_import_then_fill(tiny_encoder_dir, data_file, tmp_path):
    """The shared reference format (layout.json, int8 + offset/scale, done.npy), on a small made-up copy."""
    _, prompts = data_file
    enc = load_encoder(str(tiny_encoder_dir))
    n, h = len(prompts), enc.hidden_size
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    layout = {"hidden_states": {"mean": [0, 1], "last": [2]}, "rows": n}
    (ref / "layout.json").write_text(json.dumps(layout))
    done = np.arange(n) < 5
    np.save(ref / "done.npy", done)
    for pooling, layers in layout["hidden_states"].items():
        np.save(ref / f"{pooling}_int8.npy", rng.integers(-128, 128, size=(n, len(layers), h)).astype(np.int8))
        np.save(ref / f"{pooling}_offset.npy", rng.normal(size=(len(layers), h)).astype(np.float32))
        np.save(ref / f"{pooling}_scale.npy", np.full((len(layers), h), 0.01, dtype=np.float32))
    fs = import_reference(ref, tmp_path / "store", prompts=prompts, identity=enc.identity(), dtype="float32")
    q = np.load(ref / "last_int8.npy").astype(np.float32)
    expected = np.load(ref / "last_offset.npy") + 0.01 * (q + 128)
    np.testing.assert_allclose(fs.get("last", rows=done), expected[done], rtol=1e-5, atol=1e-5)
    assert (fs.done == done).all()
    from prefill_router.features import extract_to_store

    filled = extract_to_store(prompts, enc, tmp_path / "store", progress=False)
    assert filled.complete
    own = enc.encode(prompts[5:], layers=[0, 1])["mean"]
    np.testing.assert_allclose(filled.get("mean", rows=~done), own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncated", "pickled", "wrong shape"])
def test_extract_names_a_damaged_done_mask_and_overwrite_recovers(tiny_encoder_dir, data_file, tmp_path, capsys,
                                                                  damage):
    import pickle

    path, _ = data_file
    out = tmp_path / "store"
    argv = ["extract", "--data", str(path), "--encoder", str(tiny_encoder_dir), "--no-progress", "--limit", "4",
            "--out", str(out)]
    assert main(argv) == 0
    done = out / "done.npy"
    if damage == "truncated":
        done.write_bytes(done.read_bytes()[:-3])
    elif damage == "pickled":  # never unpickled: loading a store must not run code
        done.write_bytes(pickle.dumps(np.ones(4, dtype=bool)))
    else:
        np.save(done, np.ones(7, dtype=bool))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    error = err.splitlines()[-1]
    assert "Traceback" not in err and error.startswith("error: ") and "done.npy" in error and "--overwrite" in error
    assert main(argv + ["--overwrite"]) == 0
    assert FeatureSet.open(out).complete
