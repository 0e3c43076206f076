"""`prefill-router evaluate` end to end on small routing files written here."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from prefill_router.cli import main

MATHS = ["integral of x squared", "solve the quadratic equation", "derivative of sine", "prime factors of 91",
         "area of a circle radius", "sum of an arithmetic series"]
LAW = ["the court ruled the contract void", "tort liability of the landlord", "appeal to the supreme court",
       "statute of limitations for fraud", "breach of fiduciary duty", "burden of proof in criminal trials"]


def write_long_csv(path, targets, seed=0, n=72):
    """Target 0 (cheap) is right on maths prompts, target 1 on law prompts, target 2 (pricey) on 70% at random."""
    rng = np.random.default_rng(seed)
    costs = {"cheap": 0.001, "mid": 0.002, "pricey": 0.01}
    rows = []
    for i in range(n):
        maths = i % 2 == 0
        prompt = f"{(MATHS if maths else LAW)[rng.integers(6)]} variant {i}"
        right = {"cheap": maths, "mid": not maths, "pricey": rng.random() < 0.7}
        for t in targets:
            rows.append({"prompt_id": f"p{i}", "prompt": prompt, "target": t, "score": int(right[t]),
                         "cost": costs[t], "category": "maths" if maths else "law"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def run_cli(tmp_path, data, *extra):
    out = tmp_path / "out"
    rc = main(["evaluate", "--dataset", str(data), "--folds", "3", "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), *extra])
    return rc, out


def test_evaluate_many_targets(tmp_path, capsys):
    data = write_long_csv(tmp_path / "outcomes.csv", ["cheap", "mid", "pricey"])
    rc, out = run_cli(tmp_path, data, "--contenders", "tfidf,prior,label-oracle")
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("random", "best single", "oracle", "tfidf-logreg", "prior", "label-oracle"):
        assert f"| {name} |" in printed
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "cost_quality.png"}
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert report["n_rows"] == 72 and report["n_folds"] == 3
    # A predictor that knows the labels routes like the oracle: same accuracy, the whole gap captured.
    assert summary["label-oracle"]["accuracy"]["mean"] == pytest.approx(summary["oracle"]["accuracy"]["mean"])
    assert summary["label-oracle"]["gap_captured"]["mean"] == pytest.approx(1.0)
    # The oracle is right whenever cheap or mid is (every prompt), so its accuracy is 1.
    assert summary["oracle"]["accuracy"]["mean"] == pytest.approx(1.0)
    # Words tell maths from law, so TF-IDF routes far better than any single target (best one: pricey, ~70%).
    assert summary["tfidf-logreg"]["accuracy"]["mean"] > summary["best single"]["accuracy"]["mean"] + 0.1
    assert summary["tfidf-logreg"]["mean_auc"]["mean"] > 0.8
    # P-AUCCC beside AIQ for every router, none for the fixed baselines (they have no sweep)
    assert "| AIQ | P-AUCCC |" in printed
    for name in ("tfidf-logreg", "prior", "label-oracle"):
        assert 0.0 < summary[name]["p_auccc"]["mean"] <= 1.0
    assert summary["oracle"]["p_auccc"]["mean"] is None  # no sweep: no area
    # knowing the answers, the label oracle is fully right at cheap and mid's cost; the prior (the same P for
    # every prompt) only moves between single targets, so it covers less at every budget
    assert summary["label-oracle"]["p_auccc"]["mean"] > summary["prior"]["p_auccc"]["mean"]
    assert "two_target" not in report


def test_evaluate_two_targets_reports_apgr(tmp_path, capsys):
    data = write_long_csv(tmp_path / "pair.csv", ["cheap", "pricey"], seed=1)
    rc, out = run_cli(tmp_path, data, "--contenders", "label-oracle,tfidf")
    assert rc == 0
    printed = capsys.readouterr().out
    assert "APGR" in printed and "CPT(50%)" in printed
    report = json.loads((out / "report.json").read_text())
    two = report["two_target"]
    assert two["weak"] == "cheap" and two["strong"] == "pricey"
    rows = two["rows"]
    # The label oracle's held-out predictions reach the APGR code: its score P(strong)-P(weak) is exactly the
    # oracle score y_strong - y_weak, fold by fold.
    assert rows["label-oracle [P(strong)-P(weak)]"]["apgr"]["folds"] == pytest.approx(rows["oracle"]["apgr"]["folds"])
    assert rows["oracle"]["apgr"]["mean"] > 0.9
    assert {"tfidf-logreg [P(strong)-P(weak)]", "tfidf-logreg [P(strong)]", "random"} <= set(rows)
    assert "Two-model routing" in (out / "report.md").read_text()


def test_evaluate_embedding_contenders_with_a_small_model(tmp_path, capsys):
    from test_baselines import make_tiny_bert

    model = make_tiny_bert(tmp_path / "bert")
    data = write_long_csv(tmp_path / "outcomes.csv", ["cheap", "mid", "pricey"], n=30)
    rc, out = run_cli(tmp_path, data, "--contenders", "knn,logreg,mlp", "--embedding-model", str(model),
                      "--knn-k", "3")
    assert rc == 0
    summary = json.loads((out / "report.json").read_text())["summary"]
    for name in ("knn-minilm", "logreg-minilm", "mlp-minilm"):
        assert 0.0 <= summary[name]["accuracy"]["mean"] <= 1.0
    # The embeddings were cached: a second run embeds nothing new.
    cache_files = sorted((tmp_path / "cache").rglob("shard-*.safetensors"))
    assert cache_files
    rc, _ = run_cli(tmp_path, data, "--contenders", "knn", "--embedding-model", str(model), "--knn-k", "3")
    assert rc == 0 and sorted((tmp_path / "cache").rglob("shard-*.safetensors")) == cache_files


def test_evaluate_errors_name_the_problem(tmp_path, capsys):
    data = write_long_csv(tmp_path / "outcomes.csv", ["cheap", "mid"], n=12)
    rc, _ = run_cli(tmp_path, data, "--contenders", "tfidf,bogus")
    assert rc == 2 and "bogus" in capsys.readouterr().err
    rc, _ = run_cli(tmp_path, data, "--targets", "cheap,gpt-9")
    err = capsys.readouterr().err
    assert rc == 2 and "gpt-9" in err and "cheap" in err
    rc, _ = run_cli(tmp_path, tmp_path / "nope.csv")
    assert rc == 2 and "nope.csv" in capsys.readouterr().err
    rc, _ = run_cli(tmp_path, data, "--limit", "2")
    assert rc == 2 and "--limit" in capsys.readouterr().err


def test_evaluate_prefill_contenders_from_a_feature_store(tmp_path, capsys, tiny_encoder_dir):
    """extract (tiny random encoder) -> evaluate with the prefill contenders beside a semantic one."""
    data = write_long_csv(tmp_path / "outcomes.csv", ["cheap", "mid"], n=48)
    store = tmp_path / "features"
    assert main(["extract", "--data", str(data), "--encoder", str(tiny_encoder_dir), "--poolings", "mean",
                 "--threads", "1", "--no-progress", "--out", str(store)]) == 0
    capsys.readouterr()
    rc, out = run_cli(tmp_path, data, "--contenders", "prefill-trunk,prefill-logreg,tfidf", "--features",
                      str(store), "--pca", "8", "--seeds", "2", "--keep", "1")
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("prefill-trunk", "prefill-logreg", "tfidf-logreg"):
        assert f"| {name} |" in printed
    summary = json.loads((out / "report.json").read_text())["summary"]
    # Probabilities are real predictions: an AUC exists for every fold and lies in [0, 1].
    assert 0.0 <= summary["prefill-trunk"]["mean_auc"]["mean"] <= 1.0
    assert "APGR" in printed  # two targets: RouteLLM's metrics for the prefill router too


def test_prefill_contenders_need_a_feature_store(tmp_path, capsys):
    data = write_long_csv(tmp_path / "outcomes.csv", ["cheap", "mid"], n=12)
    rc, _ = run_cli(tmp_path, data, "--contenders", "prefill-trunk")
    assert rc == 2
    assert "--features" in capsys.readouterr().err


def test_sample_selects_the_same_prompts_in_extract_and_evaluate(tmp_path, capsys, tiny_encoder_dir):
    """A store extracted with --sample, and a full store read with --sample, give the same prefill report;
    a store that lacks the sampled prompts is refused with a message that says so."""
    data = write_long_csv(tmp_path / "outcomes.csv", ["cheap", "mid"], n=60)
    extract = ["extract", "--data", str(data), "--encoder", str(tiny_encoder_dir), "--poolings", "mean",
               "--threads", "1", "--no-progress"]
    assert main([*extract, "--sample", "24", "--out", str(tmp_path / "sampled")]) == 0
    assert main([*extract, "--out", str(tmp_path / "full")]) == 0
    assert main([*extract, "--limit", "24", "--out", str(tmp_path / "first")]) == 0
    capsys.readouterr()
    reports = []
    for store in ("sampled", "full"):
        rc, out = run_cli(tmp_path, data, "--sample", "24", "--contenders", "prefill-logreg", "--features",
                          str(tmp_path / store), "--pca", "8", "--out", str(tmp_path / f"eval-{store}"))
        assert rc == 0
        reports.append(json.loads((tmp_path / f"eval-{store}" / "report.json").read_text()))
    assert reports[0]["summary"]["prefill-logreg"] == reports[1]["summary"]["prefill-logreg"]
    capsys.readouterr()
    rc, _ = run_cli(tmp_path, data, "--sample", "24", "--contenders", "prefill-logreg", "--features",
                    str(tmp_path / "first"))
    assert rc == 2 and "lacks" in capsys.readouterr().err
    rc, _ = run_cli(tmp_path, data, "--sample", "24", "--limit", "24")
    assert rc == 2 and "--sample" in capsys.readouterr().err
