"""Adding a target to a trained router from a few labels: one new output per ensemble member, on its frozen trunk.

    new = add_target(router, "gpt-5-mini", X, y, price=Price(0.25, 2.0))   # X: [N, hidden states, H], y: [N]

Nothing the router already had changes: every member's trunk and old output rows are copied bit for bit, so
the old targets' P are the same function as before (equal up to float32 rounding of the wider matmul, below
1e-6). Each member gains one output row, a logistic regression on that member's frozen trunk features h:

    logit = h . (W_old^T (s / K + e) + d) + b
    loss  = mean BCE + alpha_mix * |e|^2 + alpha_free * |d|^2

W_old [K, width] are the member's old output rows. The first term is a mix of the old heads' logits, shrunk
towards their plain mean (e = 0): a new model fails mostly where the known ones do, and one of them may be its
close relative (a model's smaller sibling), so 50 labels need to learn only a few weights. d is a free correction
in the trunk's feature space, for what no old head reads (it matters when the router has few targets). s and b
are free. alpha_mix is chosen by k-fold cross-validated log loss on the labels with d left out; then alpha_free,
and d is kept only if it lowers that loss (one choice for every member). The out-of-fold predictions at the
chosen penalties are reported as the new head's cross-validated AUC; with 50-100 labels that choice is noisy (on
MMLU-Pro one fold in five fell below the no-label prior, see bench/README.md), so read it beside `prior_auc`.
(The one-standard-error rule, the strongest penalty within one standard error of the lowest loss, was measured
too: steadier at 50-100 labels, 0.01-0.03 AUC worse from 250 on.) The fit is full-batch L-BFGS in float64:
deterministic for the same labels.

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
    frozen = [_frozen(net, Z) for net in router.predictor.members]
    target = torch.from_numpy(y)
    parts = _stratified_parts(binarise(y), min(folds, right, len(y) - right), seed)
    mix = {a: _cross_validate(frozen, target, parts, a, None) for a in alphas}  # d left out
    alpha_mix = min(mix, key=lambda a: mix[a][0])  # first of equal losses: the smallest alpha
    free = {a: _cross_validate(frozen, target, parts, alpha_mix, a) for a in alphas}
    best_free = min(free, key=lambda a: free[a][0])
    # the correction only when it helps out of fold
    alpha_free = best_free if free[best_free][0] < mix[alpha_mix][0] else None
    loss, P_oof = mix[alpha_mix] if alpha_free is None else free[alpha_free]
    new_members = [_with_output(net, *_fit_head(*f, target, alpha_mix, alpha_free))
                   for net, f in zip(router.predictor.members, frozen)]

    predictor = copy.copy(router.predictor)
    predictor.members, predictor.n_targets = new_members, len(router.targets) + 1
    record = {"name": name, "labels": len(y), "right": right, "source": source,
              "alpha_mix": float(alpha_mix), "alpha_free": alpha_free, "cv_folds": len(parts),
              "cv_log_loss": float(loss),
              "cv_log_loss_by_alpha": {"mix": {f"{a:g}": mix[a][0] for a in alphas},
                                       "free": {f"{a:g}": free[a][0] for a in alphas}},
              "cv_auc": _finite_or_none(roc_auc(y, P_oof)),
              # the plain mean of the old heads, before any fit: what the labels add is cv_auc - prior_auc
              "prior_auc": _finite_or_none(roc_auc(y, np.mean([(L.mean(dim=1) + b).numpy()
                                                               for _, L, _, b in frozen], axis=0))),
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
                  training=training, encoder=router.encoder, sources=router.sources,
                  fallback=None if router.fallback is None else router.fallback.with_target(float(y.mean())))


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


def _frozen(net: SharedTrunkNet, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trunk features H [N, width], old heads' logits without bias L = H W_old^T [N, K], W_old [K, width], mean
    old bias), float64, dropout off."""
    net.eval()
    with torch.no_grad():
        H, W = net.trunk(Z).double(), net.head.weight.double()
        return H, H @ W.T, W, net.head.bias.double().mean()


def _cross_validate(frozen: list, y: torch.Tensor, parts: list[np.ndarray], alpha_mix: float,
                    alpha_free: float | None) -> tuple[float, np.ndarray]:
    """(held-out log loss averaged over rows and members, out-of-fold P [N] averaged over members)."""
    loss, P = 0.0, np.zeros((len(frozen), len(y)))
    for m, (H, L, W, b0) in enumerate(frozen):
        for part in parts:
            train = np.setdiff1d(np.arange(len(y)), part)
            w, b = _fit_head(H[train], L[train], W, b0, y[train], alpha_mix, alpha_free)
            logits = H[part] @ w + b
            P[m, part] = torch.sigmoid(logits).numpy()
            loss += float(nn.functional.binary_cross_entropy_with_logits(logits, y[part], reduction="sum"))
    return loss / (len(y) * len(frozen)), P.mean(axis=0)


def _fit_head(H: torch.Tensor, L: torch.Tensor, W: torch.Tensor, b0: torch.Tensor, y: torch.Tensor,
              alpha_mix: float, alpha_free: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [width], b) minimising the loss of the module docstring (convex in s, e, d, b); no d when alpha_free
    is None. L = H W^T is passed in so the cross-validation computes it once."""
    K = W.shape[0]
    s = torch.ones((), dtype=torch.float64, requires_grad=True)
    e = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    d = torch.zeros(W.shape[1], dtype=torch.float64, requires_grad=alpha_free is not None)
    b = b0.clone().requires_grad_(True)
    params = [s, e, b] + ([d] if alpha_free is not None else [])
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = L @ (s / K + e) + b
        penalty = alpha_mix * (e * e).sum()
        if alpha_free is not None:
            logits = logits + H @ d
            penalty = penalty + alpha_free * (d * d).sum()
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y) + penalty
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (W.T @ (s / K + e) + d).detach(), b.detach()


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
