"""Report: fold statistics, Markdown table, JSON round trip and the cost-quality plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from prefill_router.evaluate.report import Report, ReportRow
from prefill_router.evaluate.sweep import Curve


def _curve(acc, cost) -> dict:
    n = len(acc)
    return Curve("utility", np.linspace(0, 1, n), np.asarray(acc, float), np.asarray(cost, float),
                 np.full((n, 2), 0.5), np.zeros(n, int)).to_dict()


def small_report() -> Report:
    nan = float("nan")
    router = ReportRow("router", "router",
                       folds=[{"accuracy": 0.5, "cost_per_1k": 2.0, "mean_auc": 0.7, "aiq": nan},
                              {"accuracy": 0.7, "cost_per_1k": 4.0, "mean_auc": 0.8, "aiq": nan}],
                       curves=[_curve([0.4, 0.5], [0.001, 0.002]), _curve([0.6, 0.7], [0.003, 0.004])],
                       distributions=[[0.25, 0.75], [0.75, 0.25]])
    oracle = ReportRow("oracle", "baseline", folds=[{"accuracy": 0.9, "cost_per_1k": 1.0},
                                                    {"accuracy": 0.9, "cost_per_1k": 1.0}],
                       distributions=[[1.0, 0.0], [1.0, 0.0]])
    return Report(targets=["cheap", "dear"], n_rows=20, n_folds=2, rows=[oracle, router],
                  notes=["a note"], target_points=[{"accuracy": [0.4, 0.8], "cost": [0.001, 0.005]}] * 2)


def test_fold_statistics_by_hand():
    r = small_report().row("router")
    mean, std = r.stat("accuracy")
    assert mean == pytest.approx(0.6)
    assert std == pytest.approx(math.sqrt((0.1 ** 2 + 0.1 ** 2) / 1))  # ddof = 1
    assert all(math.isnan(v) for v in r.stat("aiq"))
    assert all(math.isnan(v) for v in r.stat("not reported"))
    curve = r.mean_curve()
    assert curve.accuracy.tolist() == pytest.approx([0.5, 0.6])
    assert curve.cost.tolist() == pytest.approx([0.002, 0.003])
    one_fold = ReportRow("x", "router", folds=[{"accuracy": 0.5}])
    assert one_fold.stat("accuracy")[0] == 0.5 and math.isnan(one_fold.stat("accuracy")[1])
    with pytest.raises(KeyError, match="no row named 'nope'"):
        small_report().row("nope")


def test_markdown_table():
    md = small_report().to_markdown()
    assert "20 prompts, 2 targets, 2 folds" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| router |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "60.00% ± 14.14"      # accuracy
    assert cells[2] == "$3.0000 ± 1.4142"    # USD per 1k
    assert cells[5] == "0.750 ± 0.071"       # mean AUC
    assert cells[6] == "—"                   # AIQ missing in every fold
    assert "| target | oracle | router |" in md  # mean routing distribution, one line per target
    assert "| cheap | 100.0% | 50.0% |" in md
    assert "- a note" in md
    single = Report(["a"], 5, 1, [ReportRow("r", "router", folds=[{"accuracy": 0.25, "cost_per_1k": 1.5}])])
    line = next(ln for ln in single.to_markdown().splitlines() if ln.startswith("| r |"))
    assert "| 25.00% | $1.5000 |" in line  # one fold: no spread to show


def test_json_round_trip_writes_nan_as_null(tmp_path):
    report = small_report()
    path = report.to_json(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["rows"][1]["folds"][0]["aiq"] is None
    assert data["summary"]["router"]["accuracy"]["mean"] == pytest.approx(0.6)
    again = Report.from_json(path)
    assert again.to_markdown() == report.to_markdown()
    assert math.isnan(again.row("router").folds[0]["aiq"])

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        Report.from_json(bad)
    bad.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        Report.from_json(bad)


def test_save_writes_all_three_files(tmp_path):
    paths = small_report().save(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.json", "report.md", "cost_quality.png"}
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_pool_summary_shows_savings_at_best_single_accuracy_only_when_every_fold_reaches_it():
    from prefill_router.evaluate.report import pool_summary

    always = ReportRow("always", "router", folds=[{"savings_at_best_single_accuracy": 0.2},
                                                   {"savings_at_best_single_accuracy": 0.4}])
    once = ReportRow("once", "router", folds=[{"savings_at_best_single_accuracy": 0.8}, {"accuracy": 0.5}])
    rows = {r["name"]: r for r in pool_summary(Report(["a", "b"], 10, 2, [always, once]))}
    assert rows["always"]["savings_at_best_single_accuracy"] == pytest.approx(0.3)
    assert math.isnan(rows["once"]["savings_at_best_single_accuracy"])  # one fold never got there


def test_tables_say_how_many_folds_a_partial_figure_averages():
    from prefill_router.evaluate.report import pool_markdown, pool_summary

    folds = [{"accuracy": 0.6, "savings_at_best_single_accuracy": 0.3},
             {"accuracy": 0.6, "savings_at_best_single_accuracy": 0.4},
             {"accuracy": 0.6}, {"accuracy": 0.6}, {"accuracy": 0.6}]
    twice = ReportRow("knn", "router", folds=folds)
    never = ReportRow("prior", "router", folds=[{"accuracy": 0.5}] * 5)
    every = ReportRow("trunk", "router", folds=[{"accuracy": 0.7, "savings_at_best_single_accuracy": 0.2}] * 5)
    report = Report(["a", "b"], 50, 5, [twice, never, every])
    md = report.to_markdown()
    operating = md.split("## Utility-policy operating points")[1].splitlines()
    line = {name: next(ln for ln in operating if ln.startswith(f"| {name} |")) for name in ("knn", "prior", "trunk")}
    assert "35.00% ± 7.07 (2 of 5 folds)" in line["knn"]
    assert "— (0 of 5 folds)" in line["prior"]
    assert "of 5 folds" not in line["trunk"] and "20.00%" in line["trunk"]
    assert "(k of n folds) is the mean over the k folds" in md
    assert "of 5 folds" not in small_report().to_markdown()  # every figure covers every fold: no marks

    pool = pool_markdown("pool", pool_summary(report))
    assert "— (2 of 5 folds reach it)" in pool and "— (0 of 5 folds reach it)" in pool


def test_p_auccc_is_a_column_beside_aiq_in_the_main_and_pool_tables():
    from prefill_router.evaluate.report import pool_markdown, pool_summary

    router = ReportRow("router", "router", folds=[{"accuracy": 0.5, "aiq": 0.6, "p_auccc": 0.4},
                                                  {"accuracy": 0.7, "aiq": 0.8, "p_auccc": 0.6}])
    oracle = ReportRow("oracle", "baseline", folds=[{"accuracy": 0.9}, {"accuracy": 0.9}])
    report = Report(["a", "b"], 10, 2, [oracle, router])
    md = report.to_markdown()
    header = next(ln for ln in md.splitlines() if ln.startswith("| | accuracy |"))
    titles = [c.strip() for c in header.strip("|").split("|")]
    assert titles.index("P-AUCCC") == titles.index("AIQ") + 1
    cells = [c.strip() for c in next(ln for ln in md.splitlines() if ln.startswith("| router |")).strip("|").split("|")]
    assert cells[titles.index("AIQ")] == "0.700 ± 0.141"
    assert cells[titles.index("P-AUCCC")] == "0.500 ± 0.141"
    assert "P-AUCCC: area under their running-max cost-coverage curve" in md  # the legend says what it is
    # baselines have no sweep, so no P-AUCCC: a dash, not 0
    oracle_cells = [c.strip() for c in next(ln for ln in md.splitlines()
                                             if ln.startswith("| oracle |")).strip("|").split("|")]
    assert oracle_cells[titles.index("P-AUCCC")] == "—"
    rows = pool_summary(report)
    assert rows[1]["p_auccc"] == pytest.approx(0.5)
    pool = pool_markdown("pool", rows)
    assert "| AIQ | P-AUCCC |" in pool and "| 0.700 | 0.500 |" in pool
    # no row with an area: no legend
    assert "P-AUCCC:" not in Report(["a"], 5, 1, [ReportRow("r", "router", folds=[{"accuracy": 0.5}])]).to_markdown()


def test_per_group_table_lists_every_category():
    def group(acc, n):
        return {"accuracy": acc, "cost_per_1k": 1.0, "n": n}

    by_group = [{"maths": group(0.8, 3), "law": group(0.2, 2)}, {"maths": group(0.6, 2), "law": group(0.4, 3)}]
    row = ReportRow("router", "router", folds=[{"accuracy": 0.5}] * 2, by_group=by_group)
    md = Report(["a"], 10, 2, [row]).to_markdown()
    assert "## Accuracy per group" in md
    assert "| law | 5 | 30.00% |" in md and "| maths | 5 | 70.00% |" in md
