"""`prefill-router train --add-target NAME --labels FILE --from CHECKPOINT --out NEW`: add a target to a trained
router from a few labelled prompts, by fitting one new output head on its frozen trunk (router/add_target.py).

The labels file is routing data (docs/data-formats.md): long layout `prompt_id, prompt, target, score [, cost,
output_tokens]` or wide with a column NAME; only NAME's non-empty scores are read. Features come from the
checkpoint's own encoder (the one named in it, refused if its files changed), or from --features, a store
`prefill-router extract --dataset FILE` made with that same encoder. The new checkpoint keeps every old head as it
was; serve it with an upstream entry named NAME in the gateway config.

Price of NAME, for a router that has prices: --price IN,OUT (USD per million input, output tokens), else the
labels file's cost column (USD per call, turned into a price per input token: total cost / total input tokens),
else refused (an unpriced target would look free). A router without prices routes on P alone and needs none.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from prefill_router.errors import CheckpointError, ConfigError, DataError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adding a target from a few labels (with --from; instead of --dataset)")
    g.add_argument("--add-target", default=None, metavar="NAME",
                   help="name of the new target: fit only its output head on the frozen trunk of --from")
    g.add_argument("--labels", default=None, metavar="FILE",
                   help="routing data with NAME's scores (long layout: prompt_id, prompt, target, score [, cost])")
    g.add_argument("--price", default=None, metavar="IN,OUT",
                   help="NAME's USD per million input and output tokens (default: from the labels' cost column)")


def _price(value: str | None):
    from prefill_router.data.prices import Price

    if value is None:
        return None
    try:
        usd_in, usd_out = (float(v) for v in value.split(","))
    except ValueError:
        raise ConfigError(f"expected two numbers IN,OUT (USD per million input and output tokens), got {value!r}",
                          field="--price") from None
    if not all(np.isfinite([usd_in, usd_out])) or min(usd_in, usd_out) < 0:
        raise ConfigError(f"prices must be finite numbers >= 0, got {value!r}", field="--price")
    return Price(usd_in, usd_out)


def run(args: argparse.Namespace) -> int:
    name = args.add_target.strip()
    if args.feedback:
        raise ConfigError("--add-target and --feedback are alternatives; give one")
    if not args.from_checkpoint:
        raise ConfigError("--add-target needs --from CHECKPOINT (the router to add the target to)")
    if not args.labels:
        raise ConfigError("--add-target needs --labels FILE (prompts with the new target's scores)")
    if args.dataset:
        raise ConfigError("--add-target reads its prompts from --labels, not --dataset")
    price = _price(args.price)
    # Imported after the argument checks, so that a mistyped command answers without loading torch.
    from prefill_router.data import read_routing_data
    from prefill_router.router import Router
    from prefill_router.router.add_target import add_target, check_new_labels, price_from_costs, require_price

    router = Router.load(args.from_checkpoint)
    if name in router.targets:
        raise ConfigError(f"{name!r} is already a target of {args.from_checkpoint} "
                          f"({', '.join(router.targets)}); choose another name", field="--add-target")
    ds = read_routing_data(args.labels)
    if name not in ds.targets:
        raise DataError(f"no row scores target {name!r} (the file scores {', '.join(ds.targets)})",
                        file=args.labels)
    k = ds.targets.index(name)
    # Refuse too few labels and a missing price before encoding, which may take minutes.
    rows = np.flatnonzero(check_new_labels(name, ds.Y[:, k]))
    costs = ds.C[rows, k]
    if price is None and not np.isfinite(costs).any():
        require_price(router, name, None)
    prompts = [ds.prompts[i] for i in rows]
    X, tokens = _features(args, router, prompts)

    if price is None and router.cost_model is not None and np.isfinite(costs).any():
        price = price_from_costs(costs, tokens)
    out_tokens = None if ds.output_tokens is None else ds.output_tokens[rows, k]
    new = add_target(router, name, X, ds.Y[rows, k], price=price, output_tokens=out_tokens, seed=args.seed,
                     source=str(Path(args.labels).resolve()))
    folder = new.save(args.out)
    info = new.training["added_targets"][-1]
    auc = "n/a" if info["cv_auc"] is None else f"{info['cv_auc']:.3f}"
    prior = "n/a" if info["prior_auc"] is None else f"{info['prior_auc']:.3f}"
    free = "left out" if info["alpha_free"] is None else f"alpha {info['alpha_free']:g}"
    print(f"added {name!r} from {info['labels']} labelled prompts ({info['right']} right): cross-validated AUC "
          f"{auc} (the old heads' plain mean ranks them at {prior}); mix of old heads alpha {info['alpha_mix']:g}, "
          f"free correction {free}")
    if info["price"] is not None:
        print(f"price: {json.dumps(info['price'])}")
    print(f"targets: {', '.join(new.targets)}; the old {len(router.targets)} heads are unchanged; default policy "
          f"{new.describe_policy()}")
    print(f"router checkpoint written to {folder} (serve it with an upstream entry named {name!r})")
    return 0


def _features(args: argparse.Namespace, router, prompts: list) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, router's hidden states, H], input tokens [N]) of the labelled prompts: from --features when
    given (the checkpoint's encoder must have made it), else computed with the checkpoint's encoder."""
    if args.features and len(router.sources) > 1:
        raise ConfigError(f"{args.from_checkpoint} reads several feature sources "
                          f"({', '.join(s['pooling'] for s in router.sources)}); leave --features out and its "
                          "encoder computes them", field="--features")
    if args.features:
        return _store_features(args, router, prompts)
    from tqdm.auto import tqdm

    X, tokens = [], []
    for start in tqdm(range(0, len(prompts), 32), desc=f"encoding {len(prompts)} prompts", unit="batch"):
        x, t, _, _ = router.encode(prompts[start:start + 32])
        X.append(x)
        tokens.append(t)
    return np.concatenate(X), np.concatenate(tokens)


def _store_features(args: argparse.Namespace, router, prompts: list) -> tuple[np.ndarray, np.ndarray]:
    from prefill_router.features import FeatureSet
    from prefill_router.features.store import identity_diff

    if not Path(args.features).exists():
        raise ConfigError(f"{args.features} does not exist (create it with `prefill-router extract --dataset "
                          f"{args.labels}`, or leave --features out to encode with the checkpoint's encoder)",
                          field="--features")
    store = FeatureSet.open(args.features)
    trained = router.encoder_identity or {}
    differ = identity_diff(store.identity, trained)
    if differ:
        raise CheckpointError(
            f"--features: {args.features} holds features of encoder {store.identity.get('model')!r} but "
            f"{args.from_checkpoint} was trained on encoder {trained.get('model')!r} (they differ in "
            f"{', '.join(differ)}); extract the labels with the checkpoint's encoder, or leave --features out")
    rows = store.rows_of(prompts)
    missing = int((~store.done[rows]).sum())
    if missing:
        raise ConfigError(f"{missing} of the {len(prompts)} labelled prompts have no features yet in "
                          f"{args.features}; run the same `prefill-router extract` again to finish them",
                          field="--features")
    X = store.get(router.pooling, router.hidden_states, rows=rows)
    return X, store.tokens[rows].astype(np.float64)
