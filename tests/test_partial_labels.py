"""Partial and graded labels everywhere (issue 13, item 8): empty scores are missing, graded scores are expected
correctness, per-row costs are used as is, a category column stratifies folds and gets its own report table,
and P-AUCCC sits beside AIQ. Each piece on its own, then all of them end to end through `prefill-router
evaluate`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from prefill_router.cli import main
from prefill_router.data import kfold, read_routing_data
from prefill_router.evaluate import metrics
from prefill_router.evaluate.harness import Contender, evaluate_contenders
from prefill_router.evaluate.sweep import cost_quality_curve
from prefill_router.router.baselines import KNNPredictor, LogisticPredictor, MLPPredictor, OraclePredictor
from prefill_router.router.trunk import TrunkEnsemble

MATHS = ["integral of x squared", "solve the quadratic equation", "derivative of sine", "prime factors of 91",
         "area of a circle radius", "sum of an arithmetic series"]
LAW = ["the court ruled the contract void", "tort liability of the landlord", "appeal to the supreme court",
       "statute of limitations for fraud", "breach of fiduciary duty", "burden of proof in criminal trials"]

# ---------------------------------------------------------------------------------------------------- P-AUCCC

# 2 prompts x 2 targets: A (cost 1) is right on prompt 0 only, B (cost 3) on both. The cost axis runs from
# each prompt's cheapest target (mean 1) to the dearest single target (mean 3).
Y2 = np.array([[1.0, 1.0], [0.0, 1.0]])
C2 = np.array([[1.0, 3.0], [1.0, 3.0]])
GRID = [0.0, 0.5, 10.0]


def test_p_auccc_of_a_two_prompt_sweep_by_hand():
    # A good router moves prompt 0 to A first: points (3, 1), (2, 1), (1, 0.5), at x = 1, 0.5, 0.
    # Area: (0.5 + 1) / 2 * 0.5 + 1 * 0.5 = 0.875.
    good = cost_quality_curve(np.array([[0.9, 0.95], [0.1, 0.9]]), Y2, C2, "utility", GRID)
    assert good.cost.tolist() == [3.0, 2.0, 1.0] and good.accuracy.tolist() == [1.0, 1.0, 0.5]
    assert good.p_auccc((1.0, 3.0)) == pytest.approx(0.875)
    # A bad one moves prompt 1 to A first: (3, 1), (2, 0.5), (1, 0.5). Area: 0.5 * 0.5 + (0.5 + 1) / 2 * 0.5.
    bad = cost_quality_curve(np.array([[0.1, 0.9], [0.9, 0.95]]), Y2, C2, "utility", GRID)
    assert bad.accuracy.tolist() == [1.0, 0.5, 0.5]
    assert bad.p_auccc((1.0, 3.0)) == pytest.approx(0.625)
    # AIQ's hull bridges the bad router's dip, so only P-AUCCC tells the two apart by this much
    assert bad.aiq((1.0, 3.0)) == pytest.approx(0.75)


def test_the_harness_records_p_auccc_for_routers_on_aiqs_cost_axis():
    # The two-prompt example twice; each fold tests one copy. The label oracle (P = Y) gives the good
    # router's curve: (2, 1) at lambda 0 (prompt 0 ties), (1, 0.5) once prompt 1 goes to A -> 0.875.
    Y, C = np.vstack([Y2, Y2]), np.vstack([C2, C2])
    folds = [(np.array([2, 3]), np.array([0, 1])), (np.array([0, 1]), np.array([2, 3]))]
    report = evaluate_contenders(Y, C, folds, [Contender("label", lambda: OraclePredictor(Y), np.arange(4))],
                                 calibration_folds=0, calibration_holdout=0.0, progress=False)
    assert [f["p_auccc"] for f in report.row("label").folds] == pytest.approx([0.875, 0.875])
    assert report.summary()["label"]["p_auccc"]["mean"] == pytest.approx(0.875)
    assert all(np.isnan(f["p_auccc"]) for f in report.row("oracle").folds)  # baselines have no sweep
    assert "P-AUCCC" in report.to_markdown()


# ---------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("make", [
    lambda: KNNPredictor(k=5),
    lambda: LogisticPredictor(),
    lambda: MLPPredictor(epochs=200, lr=1e-2),
    lambda: TrunkEnsemble(seeds=1, keep=1, lr=1e-2, max_epochs=200, patience=200, dropout=(0.0, 0.0)),
], ids=["knn", "logreg", "mlp", "trunk"])
def test_predictors_learn_graded_scores_as_they_are(make):
    # Target 0 scores 0.7 on every prompt (a judge's grade), target 1 is missing on half of them and 0.2
    # elsewhere. Trained on the grade as is, a predictor says about 0.7 and 0.2; binarising at 0.5 would push
    # them to 1 and 0, and reading a missing score as 0 would pull target 1 towards 0.1.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    Y = np.column_stack([np.full(60, 0.7), np.where(np.arange(60) % 2 == 0, 0.2, np.nan)])
    P = make().fit(X, Y).predict_proba(X)
    assert P[:, 0].mean() == pytest.approx(0.7, abs=0.05)
    assert P[:, 1].mean() == pytest.approx(0.2, abs=0.05)


# ---------------------------------------------------------------------------------------------------- end to end


def write_outcomes(path, n: int = 60) -> None:
    """Long CSV: maths prompts (category maths) and law prompts (law), three targets.

    cheap: a judge grades its maths answers 0.9 and law answers 0.2; not run (empty score) on every 5th prompt.
    mid:   1 on law, 0.3 on maths.
    pricey: 0/1, right on 70% at random; not run on every 7th prompt.
    Costs differ row by row for every target.
    """
    rng = np.random.default_rng(3)
    rows = []
    for i in range(n):
        maths = i % 2 == 0
        prompt = f"{(MATHS if maths else LAW)[rng.integers(6)]} variant {i}"
        scores = {"cheap": "" if i % 5 == 0 else (0.9 if maths else 0.2),
                  "mid": 0.3 if maths else 1,
                  "pricey": "" if i % 7 == 0 else int(rng.random() < 0.7)}
        costs = {"cheap": 0.001 * (1 + i % 3), "mid": 0.002 * (1 + i % 2), "pricey": 0.01 + 0.001 * (i % 4)}
        for t in ("cheap", "mid", "pricey"):
            rows.append({"prompt_id": f"p{i}", "prompt": prompt, "target": t, "score": scores[t],
                         "cost": costs[t], "category": "maths" if maths else "law"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_evaluate_end_to_end_with_empty_and_graded_scores_and_per_row_costs(tmp_path, capsys):
    data, out = tmp_path / "outcomes.csv", tmp_path / "out"
    write_outcomes(data)
    rc = main(["evaluate", "--dataset", str(data), "--folds", "3", "--out", str(out), "--contenders",
               "tfidf,label-oracle", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}

    ds = read_routing_data(data)
    assert np.isnan(ds.Y).sum() == 12 + 9  # every 5th prompt for cheap, every 7th for pricey
    folds = kfold(ds, k=3, seed=0, stratify=True)  # what the command does
    for f, (_, test) in enumerate(folds):
        Yt, Ct = ds.Y[test], ds.C[test]
        # each target's accuracy: the mean grade over the prompts it was run on (an empty score is not a 0)
        np.testing.assert_allclose(report["target_points"][f]["accuracy"], np.nanmean(Yt, axis=0))
        assert not np.allclose(np.nanmean(Yt, axis=0), np.nan_to_num(Yt).mean(axis=0))  # the check bites
        # each target's cost: the mean of the file's own per-row costs (a target not run has no cost there)
        assert np.isnan(Ct).sum() == np.isnan(Yt).sum()
        np.testing.assert_allclose(report["target_points"][f]["cost"], np.nanmean(Ct, axis=0))
        # the oracle takes each prompt's best grade; binarising would count a 0.9 as a 1
        assert rows["oracle"]["folds"][f]["accuracy"] == pytest.approx(np.nanmax(Yt, axis=1).mean())
        # ... and pays the file's own cost of the cheapest target with that grade
        best = Yt == np.nanmax(Yt, axis=1)[:, None]
        assert rows["oracle"]["folds"][f]["cost_per_1k"] == pytest.approx(
            1000 * np.where(best, Ct, np.inf).min(axis=1).mean())
        # P-AUCCC per fold on AIQ's axis: each prompt's cheapest target to the dearest single target
        axis = (np.nanmin(Ct, axis=1).mean(), np.nanmean(Ct, axis=0).max())
        for name in ("tfidf-logreg", "label-oracle"):
            curve = rows[name]["curves"][f]
            value = rows[name]["folds"][f]["p_auccc"]
            assert value == pytest.approx(metrics.p_auccc(curve["cost"], curve["accuracy"], axis))
            assert 0.0 <= value <= 1.0
        # folds are stratified by category: 30 maths prompts over 3 folds, 10 in each
        assert rows["best single"]["by_group"][f]["maths"]["n"] == 10
        assert rows["best single"]["by_group"][f]["law"]["n"] == 10
    # graded labels still give an AUC (binarised at 0.5): the words tell maths from law
    assert report["summary"]["tfidf-logreg"]["mean_auc"]["mean"] > 0.8

    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| | accuracy |"))
    assert "| AIQ | P-AUCCC |" in header
    assert "## Accuracy per group" in md
    assert "| law | 30 |" in md and "| maths | 30 |" in md


def test_a_task_column_stratifies_folds(tmp_path):
    # 5 rare prompts among 50: stratified by the task column, each of 5 folds gets exactly one
    path = tmp_path / "tasks.csv"
    lines = ["prompt,task,a,b"] + [f"prompt {i},{'rare' if i < 5 else 'common'},1,{i % 2}" for i in range(50)]
    path.write_text("\n".join(lines) + "\n")
    ds = read_routing_data(path)
    assert ds.targets == ["a", "b"] and ds.groups[:5] == ["rare"] * 5
    groups = np.asarray(ds.groups)
    for _, test in kfold(ds, k=5, seed=0, stratify=True):
        assert (groups[test] == "rare").sum() == 1
