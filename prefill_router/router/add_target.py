"""Adding a target to a trained router from a few labels: one new output per ensemble member, on its frozen trunk.

    new = add_target(router, "gpt-5-mini", X, y, price=Price(0.25, 2.0))   # X: [N, hidden states, H], y: [N]

Nothing the router already had changes: every member's trunk and old output rows are copied bit for bit, so
the old targets' P are the same function as before (equal up to float32 rounding of the wider matmul, below
1e-6). Each member gains one output row, a logistic regression on that member's trunk features:

    logit = h . (s * w_mean + d) + b,   loss = mean BCE + alpha * |d|^2

w_mean is the mean of the member's old output rows: the trunk was trained so that this direction reads how hard
a prompt is for the targets it knows, which is most of what a new model's failures share with them. s and b
are free; the penalty pulls the rest (d) towards that prior, so 50 labels learn a scale and an offset while
1,000 labels can learn the target's own pattern. alpha is chosen by k-fold cross-validated log loss on the
labels (the same alpha for every member); the out-of-fold predictions at that alpha are reported as the new
head's cross-validated AUC. The fit is full-batch L-BFGS in float64: deterministic for the same labels.

Cost: a router without prices stays without (its policy is argmax on P, so no price is needed). A priced
router needs the new target's price (`price`, or `price_from_costs` of per-row costs); its median output
length is the median of `output_tokens` when known, else the median of the old targets' medians. The default
policy is kept as it was chosen on the old targets' out-of-fold predictions (a "fixed:k" default never picks
the new target; a utility or tolerance policy weighs it like any other).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from prefill_router.data.prices import COST_NOTE_PREFIX, CostModel, Price, PriceTable
from prefill_router.errors import ConfigError, DataError
from prefill_router.router.baselines import check_labels
from prefill_router.router.runtime import Router
from prefill_router.router.trunk import SharedTrunkNet
from prefill_router.utils import binarise, roc_auc

MIN_LABELS = 20      # fewer labelled prompts cannot both fit a head and cross-validate its penalty
MIN_PER_CLASS = 2    # right and wrong answers each, so every CV fold can see both
ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def price_from_costs(costs: np.ndarray, input_tokens: np.ndarray) -> Price:
    """A price that reproduces per-row costs (USD per call) from input tokens alone: total cost / total input
    tokens, per million, with a zero output price. An estimated cost then grows with the prompt's length and
    its mean over these prompts is the mean cost given."""
    costs, tokens = np.asarray(costs, dtype=np.float64), np.asarray(input_tokens, dtype=np.float64)
    known = np.isfinite(costs) & np.isfinite(tokens)
    if not known.any() or tokens[known].sum() <= 0:
        raise DataError("no row has both a cost and a token count to derive a price from", field="cost")
    if (costs[known] < 0).any():
        raise DataError("costs must be >= 0", field="cost")
    return Price(float(costs[known].sum() / tokens[known].sum() * 1e6), 0.0)


def check_new_labels(name: str, y: np.ndarray) -> np.ndarray:
    """The labelled rows (a bool mask) of scores y [N] for a new target; a DataError when they are too few to fit
    a head on: fewer than MIN_LABELS, or fewer than MIN_PER_CLASS right or wrong answers (score >= 0.5 is right)."""
    y = check_labels(np.asarray(y, dtype=np.float64).reshape(-1, 1))[:, 0]
    labelled = np.isfinite(y)
    n, right = int(labelled.sum()), int(binarise(y[labelled]).sum())
    if n < MIN_LABELS:
        raise DataError(f"{name!r} has {n} labelled prompt(s); adding a target needs at least {MIN_LABELS}")
    if min(right, n - right) < MIN_PER_CLASS:
        raise DataError(f"{name!r}: {right} of {n} labels are right (score >= 0.5); a head needs at least "
                        f"{MIN_PER_CLASS} right and {MIN_PER_CLASS} wrong answers to learn which prompts it fails")
    return labelled


def add_target(router: Router, name: str, X: np.ndarray, y: np.ndarray, *, price: Price | None = None,
               output_tokens: np.ndarray | None = None, alphas: Sequence[float] = ALPHAS, folds: int = 5,
               seed: int = 0, source: str | None = None) -> Router:
    """A new Router: `router` plus target `name`, whose head is fitted on features X [N, ...] (the router's
    hidden states, as `Router.predict_proba_features` reads them) and scores y [N] in [0, 1] (NaN: unlabelled,
    dropped). `router` itself is not modified. `source` (e.g. the labels file) goes in the training record."""
    name = str(name).strip()
    if not name:
        raise ConfigError("the new target needs a non-empty name", field="name")
    if name in router.targets:
        raise ConfigError(f"{name!r} is already a target of this router (targets: {', '.join(router.targets)}); "
                          "choose another name", field="name")
    X = np.asarray(X)
    labelled = check_new_labels(name, y)
    if len(X) != len(labelled):
        raise DataError(f"features have {len(X)} rows but there are {len(labelled)} labels")
    X, y = X[labelled], np.asarray(y, dtype=np.float64)[labelled]
    right = int(binarise(y).sum())
    if not len(alphas) or any(not (a > 0 and math.isfinite(a)) for a in alphas):
        raise ConfigError(f"alphas must be positive numbers, got {list(alphas)}", field="alphas")
    cost_model = _extended_cost_model(router, name, price, output_tokens)

    Z = torch.from_numpy(np.ascontiguousarray(router.transform.transform(X), dtype=np.float32))
    target = torch.from_numpy(y)
    parts = _stratified_parts(binarise(y), min(folds, right, len(y) - right), seed)
    members = router.predictor.members
    cv_loss = np.zeros((len(members), len(alphas)))
    oof = np.zeros((len(alphas), len(members), len(y)))  # out-of-fold P per alpha and member
    fitted = []
    for m, net in enumerate(members):
        H, w_prior, b_prior = _frozen(net, Z)
        for a, alpha in enumerate(alphas):
            for part in parts:
                train = np.setdiff1d(np.arange(len(y)), part)
                w, b = _fit_head(H[train], target[train], w_prior, b_prior, alpha)
                logits = H[part] @ w + b
                oof[a, m, part] = torch.sigmoid(logits).numpy()
                cv_loss[m, a] += float(nn.functional.binary_cross_entropy_with_logits(
                    logits, target[part], reduction="sum")) / len(y)
        fitted.append((H, w_prior, b_prior))
    best = int(np.argmin(cv_loss.mean(axis=0)))  # first of equal losses: the smallest alpha
    new_members = []
    for net, (H, w_prior, b_prior) in zip(members, fitted):
        w, b = _fit_head(H, target, w_prior, b_prior, alphas[best])
        new_members.append(_with_output(net, w, b))

    predictor = copy.copy(router.predictor)
    predictor.members, predictor.n_targets = new_members, len(router.targets) + 1
    P_oof = oof[best].mean(axis=0)
    record = {"name": name, "labels": len(y), "right": right, "source": source,
              "alpha": float(alphas[best]),
              "cv_folds": len(parts),
              "cv_log_loss": {f"{a:g}": float(v) for a, v in zip(alphas, cv_loss.mean(axis=0))},
              "cv_auc": _finite_or_none(roc_auc(y, P_oof)),
              # the mean old head's ranking before any fit: what the labels add is cv_auc - prior_auc
              "prior_auc": _finite_or_none(roc_auc(y, np.mean([(H @ w + b).numpy() for H, w, b in fitted], 0))),
              "price": None if cost_model is None else {
                  "usd_per_m_input": cost_model.prices[name].usd_per_m_input,
                  "usd_per_m_output": cost_model.prices[name].usd_per_m_output,
                  "median_output_tokens": float(cost_model.median_output_tokens[-1])},
              "created_unix": int(time.time())}
    training = {**router.training, "added_targets": [*router.training.get("added_targets", []), record]}
    return Router(targets=[*router.targets, name], transform=router.transform, predictor=predictor,
                  pooling=router.pooling, hidden_states=router.hidden_states,
                  encoder_identity=router.encoder_identity, encoder_spec=router.encoder_spec,
                  cost_model=cost_model, policy=router.default_policy, metrics=copy.deepcopy(router.metrics),
                  training=training, encoder=router.encoder)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def require_price(router: Router, name: str, price: Price | None) -> None:
    """A ConfigError when `router` prices its targets and the new target `name` has no price."""
    if router.cost_model is not None and price is None:
        raise ConfigError(f"{name!r} has no price, and this router prices its targets: an unpriced target would "
                          "look free to the policy; give its price (--price IN,OUT in USD per million tokens, or a "
                          "cost column in the labels file)", field="price")


def _extended_cost_model(router: Router, name: str, price: Price | None,
                         output_tokens: np.ndarray | None) -> CostModel | None:
    old = router.cost_model
    if old is None:
        if price is not None:
            warnings.warn(f"the router has no prices (its policy routes on P alone), so the price given for "
                          f"{name!r} is not used", UserWarning, stacklevel=3)
        return None
    require_price(router, name, price)
    assert price is not None
    known = np.asarray([] if output_tokens is None else output_tokens, dtype=np.float64)
    known = known[np.isfinite(known)]
    if known.size:
        median, how = float(np.median(known)), f"the median of its {known.size} known output lengths"
    else:
        median, how = float(np.median(old.median_output_tokens)), "the median of the other targets' medians"
    prices = PriceTable({**old.prices.prices, name: price}, old.prices.source)
    note = (f"{COST_NOTE_PREFIX}{name} was added later (add_target) at {price.usd_per_m_input:g} / "
            f"{price.usd_per_m_output:g} USD per million input / output tokens; its output length is {how} "
            f"({median:.0f} tokens)")
    return CostModel(prices, [*old.targets, name], np.append(old.median_output_tokens, median), [*old.notes, note])


def _stratified_parts(positive: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint parts covering every row, right and wrong answers dealt out in turn so each part has both."""
    k = max(2, k)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(positive)), rng.permutation(np.flatnonzero(~positive))])
    return [np.sort(order[i::k]) for i in range(k)]


def _frozen(net: SharedTrunkNet, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trunk features [N, width] in float64, mean old output row [width], mean old bias): dropout off."""
    net.eval()
    with torch.no_grad():
        H = net.trunk(Z).double()
        return H, net.head.weight.double().mean(dim=0), net.head.bias.double().mean()


def _fit_head(H: torch.Tensor, y: torch.Tensor, w_prior: torch.Tensor, b_prior: torch.Tensor,
              alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [width], b) minimising mean BCE(H @ (s * w_prior + d) + b, y) + alpha * |d|^2 (convex in s, d, b)."""
    s = torch.ones((), dtype=torch.float64, requires_grad=True)
    d = torch.zeros_like(w_prior, requires_grad=True)
    b = b_prior.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([s, d, b], lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(H @ (s * w_prior + d) + b, y) + alpha * (d * d).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (s * w_prior + d).detach(), b.detach()


def _with_output(net: SharedTrunkNet, w: torch.Tensor, b: torch.Tensor) -> SharedTrunkNet:
    """A copy of `net` whose head has one more output row (w, b); the trunk and the old rows are copied as
    they are."""
    new = copy.deepcopy(net)
    old = net.head
    head = nn.Linear(old.in_features, old.out_features + 1)
    with torch.no_grad():
        head.weight.copy_(torch.cat([old.weight, w.to(old.weight.dtype)[None, :]]))
        head.bias.copy_(torch.cat([old.bias, b.to(old.bias.dtype).reshape(1)]))
    new.head = head
    new.eval()
    return new
