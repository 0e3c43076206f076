"""The Ray engine on a local 2-CPU cluster: same features as the single-machine engine, resume per shard.

Ray start-up is slow on a loaded machine, so one cluster serves the whole module and the checks share runs.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from prefill_router.cli import main
from prefill_router.errors import ConfigError, EncoderError
from prefill_router.features import FeatureSet, extract_to_store, load_encoder

ray = pytest.importorskip("ray")

from prefill_router.features.distributed import (  # noqa: E402
    ShardBuffer,
    _our_cause,
    describe_encoder,
    extract_to_store_ray,
    require_ray,
)


@pytest.fixture(scope="module")
def local_cluster():
    # Workers inherit the environment of the process that starts Ray: HF_HUB_OFFLINE and the session's temporary
    # cache folders, which conftest sets at import.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _prompts(n: int) -> list:
    words = "the quick brown fox jumps over the lazy dog what is the capital of france".split()
    prompts: list = []
    for i in range(n):
        text = " ".join(words[(i + j) % len(words)] for j in range(3 + i % 17)) + f" ? {i}"
        # A few chat conversations: they travel to the workers as JSON and must come back the same.
        prompts.append([{"role": "system", "content": "answer briefly"}, {"role": "user", "content": text}]
                       if i % 10 == 3 else text)
    return prompts


def test_describe_encoder_matches_the_loaded_encoder_without_weights(tiny_encoder_dir):
    shape, real = describe_encoder(str(tiny_encoder_dir)), load_encoder(str(tiny_encoder_dir))
    assert shape.device.type == "meta"
    assert shape.identity() == real.identity()
    assert (shape.num_hidden_states, shape.hidden_size, shape.max_tokens) == \
           (real.num_hidden_states, real.hidden_size, real.max_tokens)


def test_shard_buffer_refuses_non_finite_features():
    buffer = ShardBuffer({"mean": [0, 1]}, rows=2, hidden_size=3, dtype="float16")
    with pytest.raises(Exception, match="non-finite"):
        buffer.write(np.arange(2), {"mean": np.full((2, 2, 3), 1e6)})  # overflows float16


def test_worker_errors_are_found_inside_rays_wrapping():
    try:
        try:
            raise EncoderError("prompt at row 7 is empty")
        except EncoderError as inner:
            raise RuntimeError("UDF failed") from inner
    except RuntimeError as outer:
        assert str(_our_cause(outer)) == "prompt at row 7 is empty"
    assert _our_cause(ValueError("other")) is None


def test_bad_arguments_are_named_before_ray_starts(tiny_encoder_dir, tmp_path):
    with pytest.raises(ConfigError, match="shard_size"):
        extract_to_store_ray(["a"], str(tiny_encoder_dir), tmp_path / "s", shard_size=0)
    with pytest.raises(ConfigError, match="actors"):
        extract_to_store_ray(["a"], str(tiny_encoder_dir), tmp_path / "s", actors=0)
    with pytest.raises(ConfigError, match="empty prompt list"):
        extract_to_store_ray([], str(tiny_encoder_dir), tmp_path / "s")
    with pytest.raises(EncoderError, match="row 1: empty prompt"):  # named by the driver, before any worker starts
        extract_to_store_ray(["fine", "   "], str(tiny_encoder_dir), tmp_path / "s")
    assert not (tmp_path / "s").exists()
    assert require_ray() is ray


def test_missing_ray_is_named_with_the_install_command(monkeypatch, tiny_encoder_dir, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'prefill-router\[ray\]'"):
        require_ray()
    data = tmp_path / "routing.jsonl"
    data.write_text(json.dumps({"prompt_id": "q0", "prompt": "hello", "model-a": 1}) + "\n")
    base = ["extract", "--data", str(data), "--encoder", str(tiny_encoder_dir), "--out", str(tmp_path / "s")]
    assert main(base + ["--engine", "ray"]) == 2
    assert "prefill-router[ray]" in capsys.readouterr().err
    assert main(base + ["--shard-size", "10"]) == 2
    assert "--engine ray only" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_matches_single_machine_and_resumes_per_shard(local_cluster, tiny_encoder_dir, tmp_path):
    prompts = _prompts(200)
    local = extract_to_store(prompts, load_encoder(str(tiny_encoder_dir)), tmp_path / "local",
                             dtype="float32", progress=False)

    out = tmp_path / "ray"
    run = extract_to_store_ray(prompts, str(tiny_encoder_dir), out, actors=2, shard_size=50, dtype="float32",
                               progress=False)
    assert (run.shards, sorted(run.computed), run.assembled, run.actors) == (4, [0, 1, 2, 3], 4, 2)
    assert 0 < run.compute_seconds and run.seconds > 0
    fs = run.features
    assert fs.complete and fs.n == 200
    assert fs.identity == local.identity and fs.prompt_hashes == local.prompt_hashes
    assert fs.hidden_states == local.hidden_states == {"mean": [0, 1, 2], "last": [0, 1, 2]}
    for pooling in ("mean", "last"):
        # Shards batch prompts differently from one big run; only float rounding may differ.
        np.testing.assert_allclose(fs.get(pooling), local.get(pooling), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(fs.tokens, local.tokens)
    assert json.loads((out / "manifest.json").read_text())["truncated_rows"] == 0

    # A restart after losing shard 2: only that shard is computed, the other files are left alone.
    files = sorted((out / "shards").glob("shard-*.safetensors"))
    assert [f.name for f in files] == [f"shard-{k:06d}.safetensors" for k in range(4)]
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    files[2].unlink()
    again = extract_to_store_ray(prompts, str(tiny_encoder_dir), out, actors=2, dtype="float32",
                                 progress=False)
    assert (again.computed, again.assembled, again.actors) == ([2], 1, 1)
    assert {f.name: f.stat().st_mtime_ns for f in files if f.name != files[2].name} == \
           {k: v for k, v in stamps.items() if k != files[2].name}
    assert files[2].is_file()
    np.testing.assert_allclose(FeatureSet.open(out).get("mean"), local.get("mean"), rtol=1e-4, atol=1e-5)

    # A shard written but never copied into the store (a run killed in between) is copied, not recomputed;
    # this run goes through `prefill-router extract --engine ray`.
    done = np.load(out / "done.npy")
    done[190:] = False
    np.save(out / "done.npy", done)
    data = tmp_path / "routing.jsonl"
    data.write_text("".join(json.dumps({"prompt_id": f"q{i}", "prompt": p, "model-a": i % 2})
                            + "\n" for i, p in enumerate(prompts)))
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    assert main(["extract", "--engine", "ray", "--data", str(data), "--encoder", str(tiny_encoder_dir),
                 "--no-progress", "--out", str(out)]) == 0
    assert {f.name: f.stat().st_mtime_ns for f in files} == stamps
    assert FeatureSet.open(out).complete

    # Resources the cluster cannot give are refused by name instead of waiting forever.
    with pytest.raises(ConfigError, match="gpus_per_actor"):
        extract_to_store_ray(prompts[:5], str(tiny_encoder_dir), tmp_path / "gpu", gpus_per_actor=1,
                             progress=False)
    with pytest.raises(ConfigError, match="cpus_per_actor"):
        extract_to_store_ray(prompts[:5], str(tiny_encoder_dir), tmp_path / "cpu", cpus_per_actor=3,
                             progress=False)

    # Nothing left: no shard computed, no Ray actor started; a different shard size is refused by name.
    assert extract_to_store_ray(prompts, str(tiny_encoder_dir), out, progress=False).computed == []
    with pytest.raises(ConfigError, match="shard_size"):
        extract_to_store_ray(prompts, str(tiny_encoder_dir), out, shard_size=20, progress=False)
