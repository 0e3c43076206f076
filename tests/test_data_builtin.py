"""Built-in loaders on the shared data (skipped where it is absent)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from prefill_router.cli import main
from prefill_router.data import CostModel, load_mmlu_pro, load_routellm, train_test_split
from prefill_router.data.builtin import DATA_ENV, ROUTELLM_STRONG, ROUTELLM_WEAK
from prefill_router.errors import DataError


@pytest.fixture(scope="module")
def mmlu_pro(shared_data):
    return load_mmlu_pro(shared_data)


def test_mmlu_pro_shape_order_and_prompt_format(shared_data, mmlu_pro):
    ds = mmlu_pro
    assert (ds.n, ds.k) == (12002, 28)
    with gzip.open(shared_data / "mmlu-pro" / "questions.jsonl.gz", "rt") as f:
        first = json.loads(f.readline())
    expected = first["question"] + "\n" + "\n".join(
        f"{letter}. {option}" for letter, option in zip("ABCDEFGHIJ", first["options"]))
    assert ds.prompts[0] == expected
    assert ds.prompt_ids[0] == str(first["question_id"]) and ds.groups[0] == first["category"]
    models = pd.read_csv(shared_data / "mmlu-pro" / "models.csv")
    assert ds.targets == models["model"].tolist()
    assert set(np.unique(ds.Y).tolist()) <= {0.0, 1.0}
    assert ds.input_tokens.shape == (12002,) and (ds.input_tokens > 0).all()
    assert np.isfinite(ds.C).all() and (ds.C > 0).all()


def test_mmlu_pro_labels_and_costs_match_the_outcome_file(shared_data, mmlu_pro):
    ds = mmlu_pro
    outcomes = pd.read_csv(shared_data / "mmlu-pro" / "outcomes.csv.gz")
    models = pd.read_csv(shared_data / "mmlu-pro" / "models.csv").set_index("model")
    sample = outcomes.sample(200, random_state=0)
    row = {pid: i for i, pid in enumerate(ds.prompt_ids)}
    for rec in sample.itertuples():
        i, k = row[str(rec.question_id)], ds.targets.index(rec.model)
        assert ds.Y[i, k] == rec.correct
        if rec.output_chars > 0:  # measured length: chars / 4
            out = round(rec.output_chars / 4)
            price = models.loc[rec.model]
            expected = (ds.input_tokens[i] * price.usd_per_m_input + out * price.usd_per_m_output) / 1e6
            assert ds.C[i, k] == pytest.approx(expected)
        else:
            assert np.isnan(ds.output_tokens[i, k])


def test_mmlu_pro_train_row_imputation(mmlu_pro):
    train, _ = train_test_split(mmlu_pro, test_size=0.2, seed=0)
    model = CostModel.fit(mmlu_pro, train)
    k = mmlu_pro.targets.index("gemini-1.5-pro-002")
    known = mmlu_pro.output_tokens[train, k]
    assert model.median_output_tokens[k] == np.median(known[np.isfinite(known)])
    priced = mmlu_pro.with_costs(model)
    assert any("training rows" in n for n in priced.notes)


def test_mmlu_pro_targets_and_limit(shared_data):
    ds = load_mmlu_pro(shared_data, targets=["gemini-1.5-pro-002", "Llama-2-7b-hf"], limit=50)
    assert (ds.n, ds.targets) == (50, ["gemini-1.5-pro-002", "Llama-2-7b-hf"])
    with pytest.raises(DataError, match="gpt-5"):
        load_mmlu_pro(shared_data, targets=["gpt-5"])


def test_data_root_defaults_to_the_shipped_data_and_follows_env(shared_data, monkeypatch, tmp_path):
    from prefill_router.data.builtin import SHIPPED_DATA, data_root

    monkeypatch.delenv(DATA_ENV, raising=False)
    assert data_root() == SHIPPED_DATA and load_routellm(benchmark="gsm8k").k == 2
    with pytest.raises(DataError, match="does not exist"):
        load_routellm(tmp_path / "nowhere")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match=DATA_ENV):
        load_routellm()


def test_reference_features_are_found_only_where_present(monkeypatch, tmp_path):
    from prefill_router.data import find_reference_features

    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert find_reference_features() is None
    folder = tmp_path / "data" / "mmlu-pro" / "features-smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "layout.json").write_text("{}")
    assert find_reference_features(tmp_path / "data") == folder
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "data"))
    assert find_reference_features() == folder


@pytest.mark.parametrize("benchmark", ["mmlu", "gsm8k"])
def test_routellm_excludes_contaminated_prompts(shared_data, benchmark):
    frame = pd.read_csv(shared_data / "routellm" / f"{benchmark}.csv.gz")
    lines = (shared_data / "routellm" / f"{benchmark}_contaminated_prompts.jsonl").read_text().splitlines()
    contaminated = {json.loads(line)["eval_prompt"] for line in lines if line.strip()}
    ds = load_routellm(shared_data, benchmark=benchmark)
    full = load_routellm(shared_data, benchmark=benchmark, exclude_contaminated=False)
    dropped = frame["prompt"].isin(contaminated).sum()
    assert dropped > 0 and full.n == len(frame) and ds.n == len(frame) - dropped
    assert not contaminated & set(ds.prompts)
    assert any(f"excluded {dropped} of {len(frame)}" in n for n in ds.notes)
    assert ds.targets == [ROUTELLM_WEAK, ROUTELLM_STRONG]
    kept = ~frame["prompt"].isin(contaminated).to_numpy()
    np.testing.assert_array_equal(ds.Y[:, 1], frame[ROUTELLM_STRONG].to_numpy(dtype=float)[kept])
    assert (ds.groups is not None) == (benchmark == "mmlu")
    # GPT-4 costs more than Mixtral on every prompt under the assumed prices
    assert (ds.C[:, 1] > ds.C[:, 0]).all()


def test_cli_stats_builtin(shared_data, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["data", "stats", "--builtin", "routellm-gsm8k", "--data-root", str(shared_data),
                 "--json", str(out)]) == 0
    assert "best single:     gpt-4-1106-preview" in capsys.readouterr().out
    assert json.loads(out.read_text())["n_targets"] == 2


def test_load_dataset_by_name_with_plain_arguments(tmp_path):
    """The registry every command uses: a file by path, then targets, then limit or a seeded sample."""
    from prefill_router.data import load_dataset
    from prefill_router.errors import ConfigError

    rows = [{"prompt_id": f"p{i}", "prompt": f"q{i}", "target": t, "score": (i + j) % 2, "cost": 0.001 * (j + 1),
             "category": "ab"[i % 2]} for i in range(10) for j, t in enumerate(["a", "b", "c"])]
    path = tmp_path / "outcomes.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    ds = load_dataset(str(path), targets=["c", "a"], limit=4)
    assert ds.targets == ["c", "a"] and ds.prompt_ids == ["p0", "p1", "p2", "p3"]
    assert ds.Y[:, 0].tolist() == [0, 1, 0, 1] and ds.Y[:, 1].tolist() == [0, 1, 0, 1]
    sampled = load_dataset(str(path), sample=4, sample_seed=3)
    assert sampled.n == 4 and sampled.prompt_ids == load_dataset(str(path), sample=4, sample_seed=3).prompt_ids
    assert any("--sample 4" in n for n in sampled.notes)
    bad = [({"targets": ["zz"]}, "targets"), ({"limit": 0}, "limit"), ({"limit": 2, "sample": 2}, "limit")]
    for kwargs, field in bad:
        with pytest.raises(ConfigError) as info:
            load_dataset(str(path), **kwargs)
        assert info.value.field == field
    with pytest.raises(ConfigError, match="neither a built-in dataset") as info:
        load_dataset(str(tmp_path / "nope.csv"))
    assert info.value.field == "dataset" and str(info.value).startswith("dataset: ")
