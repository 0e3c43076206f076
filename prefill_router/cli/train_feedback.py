"""`prefill-router train --feedback JOURNAL --from CHECKPOINT --out NEW`: retrain a served router on the feedback
its gateway recorded, from the stored features (no re-encoding), and accept it only if it predicts a held-out
slice of that feedback at least as well as the old one.

Writes into --out: the new checkpoint (when accepted, or with --accept-worse) and feedback_report.json /
feedback_report.md comparing old and new on the held-out slice (always).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from prefill_router.errors import CheckpointError, ConfigError, DataError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retraining on gateway feedback (instead of --features/--dataset)")
    g.add_argument("--feedback", default=None, metavar="JOURNAL",
                   help="the gateway's feedback.dir (or its feedback.jsonl)")
    g.add_argument("--from", dest="from_checkpoint", default=None, metavar="CHECKPOINT",
                   help="the checkpoint to start from: the one the gateway served when the feedback was given, "
                        "or the one --add-target adds a target to")
    g.add_argument("--refit", choices=["heads", "trunk"], default="heads",
                   help="train only the output layer on the frozen trunk, or every layer")
    g.add_argument("--feedback-holdout", type=float, default=0.2,
                   help="share of feedback rows held out to compare old and new")
    g.add_argument("--accept-worse", action="store_true",
                   help="write the new checkpoint even if it predicts the held-out feedback worse")


def run(args: argparse.Namespace) -> int:
    if not args.from_checkpoint:
        raise ConfigError("--feedback needs --from CHECKPOINT (the router the gateway served)")
    if not 0 < args.feedback_holdout < 1:
        raise ConfigError(f"--feedback-holdout must be between 0 and 1, got {args.feedback_holdout}")
    # Imported after the argument checks, so that a mistyped command answers without loading torch.
    from prefill_router.router import Router
    from prefill_router.router.refit import compare_on_feedback, refit_router
    from prefill_router.serve.journal import identity_digest, read_feedback

    old = Router.load(args.from_checkpoint)  # its encoder is never loaded: the features are stored
    rows = read_feedback(args.feedback)
    digest = identity_digest(old.encoder_identity)
    foreign = sorted({e for e in rows.encoder if e != digest})
    if foreign:
        raise DataError(f"feedback rows come from encoder(s) {foreign}, but {args.from_checkpoint} was trained on "
                        f"encoder {digest}; retrain from the checkpoint the gateway served", file=args.feedback)
    states = {json.dumps(h) for h in rows.hidden_states}
    if states != {json.dumps(old.hidden_states)}:
        raise DataError(f"feedback features hold hidden states {sorted(states)}, the checkpoint reads "
                        f"{old.hidden_states}", file=args.feedback)
    unknown = sorted(set(rows.target) - set(old.targets))
    if unknown:
        raise DataError(f"feedback scores target(s) {unknown} that {args.from_checkpoint} does not predict "
                        f"({', '.join(old.targets)})", file=args.feedback)

    k_of = {t: k for k, t in enumerate(old.targets)}
    n, K = len(rows.ids), len(old.targets)
    Y = np.full((n, K), np.nan)
    Y[np.arange(n), [k_of[t] for t in rows.target]] = rows.score
    C = np.full((n, K), np.nan)
    for i, (names, costs) in enumerate(zip(rows.targets, rows.cost)):
        for name, usd in zip(names, costs):
            if name in k_of and usd is not None:
                C[i, k_of[name]] = usd
    order = np.random.default_rng(args.seed).permutation(n)
    n_held = max(1, round(args.feedback_holdout * n))
    if n - n_held < 4:
        raise DataError(f"only {n} feedback rows: too few to hold {n_held} out and retrain on the rest",
                        file=args.feedback)
    held, train = order[:n_held], order[n_held:]

    new = refit_router(old, rows.X[train], Y[train], mode=args.refit, seed=args.seed)
    report = compare_on_feedback(old, new, rows.X[held], Y[held], C[held])
    report.update({"from": str(Path(args.from_checkpoint).resolve()), "journal": str(Path(args.feedback).resolve()),
                   "refit": args.refit, "train_rows": int(train.size), "held_out_rows": int(held.size)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    accepted = report["accepted"] or args.accept_worse
    report["written"] = bool(accepted)
    (out / "feedback_report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "feedback_report.md").write_text(markdown_report(report), encoding="utf-8")
    print(markdown_report(report))
    if not accepted:
        raise CheckpointError(f"the retrained router predicts the held-out feedback worse (log loss "
                              f"{report['new']['log_loss']:.4f} vs {report['old']['log_loss']:.4f}); no checkpoint "
                              f"written (report in {out}; --accept-worse writes it anyway)")
    new.training["feedback_report"] = {k: report[k] for k in ("old", "new", "held_out_rows", "train_rows")}
    new.save(out)
    print(f"router checkpoint written to {out}")
    return 0


def markdown_report(r: dict) -> str:
    def row(name: str, rows: int, old: dict, new: dict) -> str:
        cells = [f"{v:.4f}" if v is not None else "n/a" for metric in ("log_loss", "brier", "auc")
                 for v in (old[metric], new[metric])]
        return f"| {name} | {rows} | " + " | ".join(cells) + " |"

    lines = [f"# Retraining on feedback: old vs new on {r['held_out_rows']} held-out feedback rows", "",
             f"From `{r['from']}`, refit `{r['refit']}` on {r['train_rows']} rows.", "",
             "| | rows | log loss old | log loss new | Brier old | Brier new | AUC old | AUC new |",
             "|---|---|---|---|---|---|---|---|", row("all", r["rows"], r["old"], r["new"])]
    lines += [row(target, t["rows"], t["old"], t["new"]) for target, t in r["targets"].items()]
    if "decisions_changed" in r:
        changed = (f"Default-policy decisions changed on {r['decisions_changed']:.0%} of the held-out prompts "
                   f"(chosen before: {r['chosen_old']}; after: {r['chosen_new']}).")
        lines += ["", changed]
    if r["accepted"]:
        verdict = "Accepted: the new router's log loss is no worse."
    else:
        verdict = "Not accepted: the new router's log loss is worse." + (
            " Written anyway (--accept-worse)." if r.get("written") else "")
    lines += ["", verdict, ""]
    return "\n".join(lines)
