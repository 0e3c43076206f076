"""An evaluation report: per-fold numbers for every contender, summarised as mean ± std across folds.

    report.to_json("report.json");  Report.from_json("report.json")
    print(report.to_markdown())
    report.plot("cost_quality.png")
    report.save("runs/eval")   # report.json, report.md, cost_quality.png
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prefill_router.errors import DataError
from prefill_router.evaluate.sweep import Curve
from prefill_router.utils import json_safe, markdown_table

FORMAT_VERSION = 1

# (column title, metric key, how to print it) for the main table
_MAIN_COLUMNS = [
    ("accuracy", "accuracy", "pct"),
    ("USD / 1k queries", "cost_per_1k", "usd"),
    ("gap captured", "gap_captured", "pct"),
    ("cost savings vs most expensive", "savings_vs_most_expensive", "pct"),
    ("mean AUC", "mean_auc", "num"),
    ("AIQ", "aiq", "num"),
    ("P-AUCCC", "p_auccc", "num"),
]
# Under the main table, when a row reports AIQ or P-AUCCC: what the two areas are.
_AREA_LEGEND = ("AIQ: area under the convex hull of the utility-lambda sweep's (cost, accuracy) points; P-AUCCC: "
                "area under their running-max cost-coverage curve (evaluate.metrics.p_auccc). Both span the cost "
                "axis from each prompt's cheapest target to the most expensive single target, scaled to [0, 1].")
_OPERATING_COLUMNS = [
    ("savings at best-single accuracy", "savings_at_best_single_accuracy", "pct"),
    ("USD / 1k there", "cost_per_1k_at_best_single_accuracy", "usd"),
    ("lambda (train-calibrated)", "lambda_train", "num"),
    ("accuracy at it", "accuracy_at_lambda_train", "pct"),
    ("USD / 1k at it", "cost_per_1k_at_lambda_train", "usd"),
    ("savings at it", "savings_at_lambda_train", "pct"),
    ("gap captured at it", "gap_captured_at_lambda_train", "pct"),
]


@dataclass
class ReportRow:
    """One line of the report: a router or a fixed baseline.

    folds: one dict of metric -> value per fold; curves: one `Curve.to_dict()` per fold (routers only);
    distributions: per fold, the share of test rows routed to each target.
    predictions: per fold, (test row indices, P[len, K]) held-out predictions; in memory only (not in JSON).
    by_group: per fold, {group: {"accuracy", "cost_per_1k", "n"}} when the evaluation was given groups.
    """

    name: str
    kind: str  # "router" or "baseline"
    folds: list[dict]
    curves: list[dict] = field(default_factory=list)
    distributions: list[list[float]] = field(default_factory=list)
    predictions: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)
    by_group: list[dict] = field(default_factory=list)

    def stat(self, metric: str) -> tuple[float, float]:
        """(mean, std) of `metric` across folds, NaN folds ignored; std uses ddof=1 (NaN with one fold)."""
        values = np.array([f.get(metric, np.nan) for f in self.folds], dtype=np.float64)
        values = values[np.isfinite(values)]
        if not values.size:
            return float("nan"), float("nan")
        return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else float("nan")

    def covered(self, metric: str) -> int:
        """How many folds have a value of `metric` (the folds `stat` averages)."""
        return sum(math.isfinite(f.get(metric, np.nan)) for f in self.folds)

    def group_stat(self, group: str, metric: str = "accuracy") -> float:
        """Mean over folds of a group's metric (NaN folds and folds without the group ignored)."""
        values = np.array([f[group][metric] for f in self.by_group if group in f], dtype=np.float64)
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else float("nan")

    def mean_curve(self) -> Curve | None:
        """The fold-mean accuracy and cost at each grid point (folds share one grid), or None."""
        if not self.curves:
            return None
        cs = [Curve.from_dict(c) for c in self.curves]
        return Curve(cs[0].policy, cs[0].params, np.mean([c.accuracy for c in cs], axis=0),
                     np.mean([c.cost for c in cs], axis=0), np.mean([c.distribution for c in cs], axis=0),
                     np.sum([c.missing for c in cs], axis=0))


def _unclean(x):
    if isinstance(x, dict):
        return {k: _unclean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unclean(v) for v in x]
    return float("nan") if x is None else x


# Under a table where some figure exists in only some folds.
_PARTIAL_LEGEND = ("A figure marked (k of n folds) is the mean over the k folds where it exists: savings at "
                   "best-single accuracy, for one, exist only in folds whose utility curve reaches the best single "
                   "target's accuracy, so its mean flatters a router that often falls short.")


def _cell(row: ReportRow, metric: str, how: str) -> str:
    """mean ± std across folds, then "(k of n folds)" when only k of the row's n folds have a value."""
    covered, total = row.covered(metric), len(row.folds)
    text = _fmt(*row.stat(metric), how)
    if covered < total and (covered or metric == "savings_at_best_single_accuracy"):
        text += f" ({covered} of {total} folds)"
    return text


def _fmt(mean: float, std: float, how: str) -> str:
    """mean ± std in the column's unit; the ± part is left out when there is no spread to show (one fold)."""
    if not math.isfinite(mean):
        return "—"
    if how == "pct":
        # round first and add 0.0 so that a value like -1e-17 prints as 0.00, not -0.00
        text = f"{round(mean * 100, 2) + 0.0:.2f}%"
        spread = f"{round(std * 100, 2) + 0.0:.2f}"
    elif how == "usd":
        text, spread = f"${mean:.4f}", f"{std:.4f}"
    else:
        text, spread = f"{mean:.3f}", f"{std:.3f}"
    return f"{text} ± {spread}" if math.isfinite(std) else text


@dataclass
class Report:
    """Evaluation results. `rows` hold per-fold metrics (see harness.FOLD_METRICS for their meaning)."""

    targets: list[str]
    n_rows: int
    n_folds: int
    rows: list[ReportRow]
    notes: list[str] = field(default_factory=list)
    target_points: list[dict] = field(default_factory=list)  # per fold: each target's test accuracy and cost
    metric_help: dict[str, str] = field(default_factory=dict)

    def row(self, name: str) -> ReportRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row named {name!r} in the report; rows: {[r.name for r in self.rows]}")

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """{row name: {metric: {"mean": m, "std": s}}} over every metric any fold reported."""
        out = {}
        for r in self.rows:
            keys = sorted({k for f in r.folds for k in f})
            out[r.name] = {k: dict(zip(("mean", "std"), r.stat(k))) for k in keys}
        return out

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        return json_safe({
            "format_version": FORMAT_VERSION,
            "targets": self.targets, "n_rows": self.n_rows, "n_folds": self.n_folds, "notes": self.notes,
            "metric_help": self.metric_help, "summary": self.summary(), "target_points": self.target_points,
            "rows": [{"name": r.name, "kind": r.kind, "folds": r.folds, "curves": r.curves,
                      "distributions": r.distributions, "by_group": r.by_group} for r in self.rows],
        })

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        if d.get("format_version") != FORMAT_VERSION:
            raise DataError(f"report format_version {d.get('format_version')!r} is not {FORMAT_VERSION}")
        d = _unclean(d)
        rows = [ReportRow(r["name"], r["kind"], r["folds"], r["curves"], r["distributions"],
                          by_group=r.get("by_group", [])) for r in d["rows"]]
        return cls(d["targets"], int(d["n_rows"]), int(d["n_folds"]), rows, d["notes"], d["target_points"],
                   d.get("metric_help", {}))

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_json(cls, path) -> Report:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------ presentation

    def _table(self, columns, rows) -> list[str]:
        return markdown_table(["", *(title for title, _, _ in columns)],
                              [[r.name, *(_cell(r, key, how) for _, key, how in columns)] for r in rows])

    def _partial(self, columns, rows) -> bool:
        """Whether some cell of these columns averages fewer folds than its row has."""
        return any(0 < r.covered(key) < len(r.folds) for r in rows for _, key, _ in columns)

    def _group_table(self) -> list[str]:
        with_groups = [r for r in self.rows if r.by_group]
        if not with_groups:
            return []
        groups = sorted({g for r in with_groups for f in r.by_group for g in f})
        rows = [[g, sum(f[g]["n"] for f in with_groups[0].by_group if g in f),
                 *(_fmt(r.group_stat(g), float("nan"), "pct") for r in with_groups)] for g in groups]
        return ["", "## Accuracy per group (mean over folds; prompts per group summed over test folds)", "",
                *markdown_table(["group", "prompts", *(r.name for r in with_groups)], rows)]

    def to_markdown(self) -> str:
        """Markdown tables (mean ± std across folds) followed by the notes."""
        title = (f"# Routing evaluation: {self.n_rows} prompts, {len(self.targets)} targets, "
                 f"{self.n_folds} fold{'s' if self.n_folds != 1 else ''}")
        lines = [title, ""]
        lines += self._table(_MAIN_COLUMNS, self.rows)
        partial = self._partial(_MAIN_COLUMNS, self.rows)
        if any(math.isfinite(r.stat(key)[0]) for r in self.rows for key in ("aiq", "p_auccc")):
            lines += ["", _AREA_LEGEND]
        routers = [r for r in self.rows if r.kind == "router"]
        if routers:
            lines += ["", "## Utility-policy operating points", ""]
            lines += self._table(_OPERATING_COLUMNS, routers)
            partial = partial or self._partial(_OPERATING_COLUMNS, routers)
        if partial:
            lines += ["", _PARTIAL_LEGEND]
        with_dist = [r for r in self.rows if r.distributions]
        if with_dist:
            # targets as rows: a table 28 targets wide would not fit a page
            lines += ["", "## Routing distribution (share of test prompts per target, mean over folds)", ""]
            shares = [np.mean(np.asarray(r.distributions, dtype=np.float64), axis=0) for r in with_dist]
            lines += markdown_table(["target", *(r.name for r in with_dist)],
                                    [[target, *(f"{s[j] * 100:.1f}%" for s in shares)]
                                     for j, target in enumerate(self.targets)])
        lines += self._group_table()
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def plot(self, path, title: str | None = None) -> Path:
        """Cost-quality PNG: each router's fold-mean utility sweep and its convex hull, the fixed baselines
        and every single target (named when there are few, else the ones on the cost-accuracy frontier), cost
        in USD per 1,000 queries. `title` names the data and pool."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from prefill_router.evaluate.metrics import convex_hull

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(10.5, 5.5))
        if self.target_points:
            acc = np.nanmean([p["accuracy"] for p in self.target_points], axis=0)
            cost = np.nanmean([p["cost"] for p in self.target_points], axis=0) * 1000
            ax.scatter(cost, acc, s=14, color="0.6", label="single targets", zorder=2)
            named = np.ones(len(acc), bool) if len(acc) <= 10 else _frontier(acc, cost)
            for k in np.flatnonzero(named & np.isfinite(acc) & np.isfinite(cost)):
                ax.annotate(self.targets[k], (cost[k], acc[k]), xytext=(4, -8), textcoords="offset points",
                            fontsize=7, color="0.35")
        markers = {"random": ("s", "0.85"), "best single": ("D", "0.45"), "oracle": ("*", "black")}
        for r in self.rows:
            if r.kind == "baseline":
                m_acc, m_cost = r.stat("accuracy")[0], r.stat("cost_per_1k")[0]
                if math.isfinite(m_acc) and math.isfinite(m_cost):
                    marker, color = markers.get(r.name, ("o", "0.3"))
                    ax.scatter([m_cost], [m_acc], marker=marker, color=color, s=80, zorder=4,
                               label=r.name, edgecolor="black")
        for r in self.rows:
            curve = r.mean_curve()
            if curve is None:
                continue
            ok = np.isfinite(curve.cost) & np.isfinite(curve.accuracy)
            if not ok.any():
                continue
            (line,) = ax.plot(curve.cost[ok] * 1000, curve.accuracy[ok], marker=".", lw=1, zorder=3,
                              label=r.name)
            hc, ha = convex_hull(curve.cost[ok], curve.accuracy[ok])
            # the hull is straight in linear cost; sample it densely so a log axis shows its true shape
            dense = np.unique(np.concatenate([np.linspace(a, b, 40) for a, b in itertools.pairwise(hc)] + [hc]))
            hc, ha = dense, np.interp(dense, hc, ha)
            ax.plot(hc * 1000, ha, ls="--", lw=1.5, color=line.get_color(), zorder=3, label="_nolegend_")
        xs = [x for line in ax.get_lines() for x in line.get_xdata()]
        xs += [x for coll in ax.collections for x in coll.get_offsets()[:, 0]]
        log = bool(xs) and min(xs) > 0  # costs span orders of magnitude; log only when none is free
        if log:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"${x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("USD per 1,000 queries" + (" (log scale)" if log else ""))
        ax.set_ylabel("accuracy")
        ax.set_title((f"{title}\n" if title else "")
                     + "Cost-quality on held-out prompts (mean over folds; dashed: convex hull)")
        ax.grid(True, alpha=0.3)
        # Outside the axes: the curves end near the best single model, where a legend inside would sit.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def save(self, folder, title: str | None = None) -> dict[str, Path]:
        """Write report.json, report.md and cost_quality.png (titled `title`) into `folder` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        md = folder / "report.md"
        md.write_text(self.to_markdown())
        return {"json": self.to_json(folder / "report.json"), "markdown": md,
                "plot": self.plot(folder / "cost_quality.png", title=title)}


def _frontier(accuracy: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Targets no other target beats on both accuracy (>=) and cost (<=), strictly on one."""
    better_or_equal = (accuracy[None, :] >= accuracy[:, None]) & (cost[None, :] <= cost[:, None])
    strictly = (accuracy[None, :] > accuracy[:, None]) | (cost[None, :] < cost[:, None])
    return ~(better_or_equal & strictly).any(axis=1)


# Columns of the one-line-per-contender summary that compares target pools (the README's headline table).
POOL_COLUMNS = [("mean_auc", "mean AUC", "num"), ("accuracy", "argmax acc", "pct"),
                ("gap_captured", "gap captured", "pct"), ("cost_per_1k", "$/1k (argmax)", "usd"),
                ("accuracy_at_lambda_train", "default: acc", "pct"),
                ("cost_per_1k_at_lambda_train", "default: $/1k", "usd"),
                ("savings_vs_best_single_at_lambda_train", "default: saves vs best", "pct"),
                ("savings_at_best_single_accuracy", "savings @ best-single acc", "pct"),
                ("max_curve_accuracy", "max acc on curve", "pct"), ("aiq", "AIQ", "num"),
                ("p_auccc", "P-AUCCC", "num")]
# Columns shown as mean ± fold std: how much the default policy's outcome moves from one training set to the next.
POOL_SPREAD = ("accuracy_at_lambda_train", "savings_vs_best_single_at_lambda_train")


def pool_summary(report: Report) -> list[dict]:
    """Fold means of the headline metrics for every row of a report, plus the highest accuracy on the row's
    fold-mean utility curve."""
    out = []
    for r in report.rows:
        entry = {"name": r.name, **{key: r.stat(key)[0] for key, _, _ in POOL_COLUMNS},
                 **{f"{key}_std": r.stat(key)[1] for key in POOL_SPREAD}}
        reached = r.covered("savings_at_best_single_accuracy")
        entry["folds"], entry["folds_reaching_best_single_accuracy"] = len(r.folds), reached
        if reached < len(r.folds):  # a mean over the few folds that got there would flatter a weak router
            entry["savings_at_best_single_accuracy"] = float("nan")
        entry["max_curve_accuracy"] = (float(np.mean([np.nanmax(Curve.from_dict(c).accuracy) for c in r.curves]))
                                       if r.curves else float("nan"))
        out.append(entry)
    return out


def pool_markdown(title: str, rows: list[dict]) -> str:
    def cell(r: dict, key: str, how: str) -> str:
        text = _fmt(r[key], r.get(f"{key}_std", float("nan")), how)
        reached, folds = r.get("folds_reaching_best_single_accuracy"), r.get("folds")
        if key == "savings_at_best_single_accuracy" and reached is not None and reached < folds:
            text += f" ({reached} of {folds} folds reach it)"
        return text

    table = markdown_table(["contender", *(h for _, h, _ in POOL_COLUMNS)],
                           [[r["name"], *(cell(r, key, how) for key, _, how in POOL_COLUMNS)] for r in rows])
    return "\n".join([f"### {title}", "", *table]) + "\n"
