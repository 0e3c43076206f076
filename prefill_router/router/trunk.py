"""SharedTrunkNet: one small MLP that predicts P(correct) for every target at once, trained as a seed ensemble.

    Linear(d, 256) - ReLU - Dropout(0.3) - Linear(256, 128) - ReLU - Dropout(0.2) - Linear(128, K)

Loss: binary cross-entropy per (prompt, target), averaged over the entries that HAVE a label. A missing label
(NaN) contributes nothing: it is not "wrong". Graded labels in (0, 1) are BCE targets as they are, not
binarised: the net then predicts the expected score, which is what routed accuracy averages (the >= 0.5 rule
of `utils.binarise` is for metrics that need two classes, such as AUC).

Training: Adam (lr 1e-3, weight decay 1e-4), batch 512, at most 150 epochs, early stopping with patience 15
on an internal validation split (one split shared by every seed so their validation losses compare), the
weights of the best epoch restored. `seeds` members are trained, the `keep` with the lowest validation loss
kept, and their sigmoids averaged.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from prefill_router.errors import CheckpointError, ConfigError, DataError, parse_config
from prefill_router.router.baselines import check_labels

if TYPE_CHECKING:
    from prefill_router.progress import WorkBar


class TrunkConfig(BaseModel):
    """Every knob of SharedTrunkNet training, with the paper's defaults."""

    model_config = ConfigDict(extra="forbid")

    hidden: tuple[int, ...] = (256, 128)
    dropout: tuple[float, ...] = (0.3, 0.2)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    batch_size: int = Field(default=512, ge=1)
    max_epochs: int = Field(default=150, ge=1)
    patience: int = Field(default=15, ge=1)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    seeds: int = Field(default=10, ge=1)
    keep: int = Field(default=5, ge=1)
    seed: int = 0                       # member i trains with seed + i; the validation split uses seed
    threads: int | None = Field(default=None, ge=1)  # torch CPU threads while fitting; None leaves torch's setting
    progress: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> TrunkConfig:
        if len(self.hidden) != len(self.dropout):
            raise ConfigError(f"hidden has {len(self.hidden)} layers but dropout has {len(self.dropout)} rates")
        if self.keep > self.seeds:
            raise ConfigError(f"keep ({self.keep}) cannot exceed seeds ({self.seeds})")
        if any(not 0 <= p < 1 for p in self.dropout):
            raise ConfigError(f"dropout rates must be in [0, 1), got {self.dropout}")
        return self

    @classmethod
    def parse(cls, data: dict) -> TrunkConfig:
        return parse_config(cls, data, "invalid trunk configuration")

    def for_calibration(self, seeds: int) -> TrunkConfig:
        """The cheaper ensemble that out-of-fold calibration fits many times: `seeds` members, quietly."""
        return self.model_copy(update={"seeds": seeds, "keep": min(self.keep, seeds), "progress": False})


class SharedTrunkNet(nn.Module):
    def __init__(self, in_dim: int, n_targets: int, hidden=(256, 128), dropout=(0.3, 0.2)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h, p in zip(hidden, dropout):
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(p)]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the entries where mask is 1. `targets` must hold finite values everywhere (put anything,
    e.g. 0, where mask is 0): the masked entries get exactly zero loss and zero gradient."""
    per_entry = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (per_entry * mask).sum() / mask.sum().clamp(min=1.0)


def split_labels(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(targets with NaN replaced by 0, mask with 1 where a label exists), both float32."""
    Y = check_labels(Y)  # the baselines' check, so a bad label is the same DataError for every predictor
    mask = np.isfinite(Y)
    return np.where(mask, Y, 0.0).astype(np.float32), mask.astype(np.float32)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TrunkEnsemble:
    """Predictor (fit / predict_proba) wrapping the SharedTrunkNet seed ensemble.

    `work`: a job-wide progress bar (progress.WorkBar) that each trained seed advances by its rows, in place of
    the ensemble's own bar (`config.progress`)."""

    def __init__(self, config: TrunkConfig | dict | None = None, *, work: WorkBar | None = None, **overrides):
        if isinstance(config, dict) or config is None:
            config = TrunkConfig.parse({**(config or {}), **overrides})
        elif overrides:
            config = TrunkConfig.parse({**config.model_dump(), **overrides})
        self.config: TrunkConfig = config
        self.work = work
        self.members: list[SharedTrunkNet] = []
        self.member_seeds: list[int] = []
        self.val_losses: list[float] = []      # of the kept members, same order
        self.all_val_losses: list[float] = []  # of every trained seed, in seed order
        self.epochs: list[int] = []            # best epoch of every trained seed
        self.in_dim: int | None = None
        self.n_targets: int | None = None

    # -- training ------------------------------------------------------------------------------------
    def fit(self, X: np.ndarray, Y: np.ndarray) -> TrunkEnsemble:
        cfg = self.config
        X = np.asarray(X, dtype=np.float32)
        Y = np.asarray(Y, dtype=np.float64)
        if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
            raise DataError(f"fit needs X [N, D] and Y [N, K] with the same N, got {X.shape} and {Y.shape}")
        if not np.isfinite(X).all():
            raise DataError("X contains NaN or infinite values")
        # Rows with no label at all carry no information: dropping them first makes the result identical
        # to never having had them (the validation split included).
        labelled = np.isfinite(Y).any(axis=1)
        X, Y = X[labelled], Y[labelled]
        if len(X) < 2:
            raise DataError(f"need at least 2 rows with a label to train, got {len(X)}")
        targets, mask = split_labels(Y)
        n = len(X)
        order = np.random.default_rng(cfg.seed).permutation(n)
        n_val = min(max(1, int(round(cfg.val_fraction * n))), n - 1)
        val, train = order[:n_val], order[n_val:]
        self.in_dim, self.n_targets = X.shape[1], Y.shape[1]

        with _torch_threads(cfg.threads):
            t = {name: torch.from_numpy(np.ascontiguousarray(a[idx]))
                 for name, a, idx in [("Xtr", X, train), ("Ytr", targets, train), ("Mtr", mask, train),
                                      ("Xva", X, val), ("Yva", targets, val), ("Mva", mask, val)]}
            trained = []
            seeds = [cfg.seed + i for i in range(cfg.seeds)]
            for s in tqdm(seeds, desc="SharedTrunkNet seeds", disable=not cfg.progress or self.work is not None):
                started = time.perf_counter()
                trained.append(self._train_one(t, s))
                if self.work is not None:
                    self.work.fitted(len(labelled), time.perf_counter() - started)
        self.all_val_losses = [loss for _, loss, _ in trained]
        self.epochs = [ep for _, _, ep in trained]
        # Stable sort: equal losses keep seed order, so the choice is deterministic.
        best = sorted(range(len(trained)), key=lambda i: trained[i][1])[: cfg.keep]
        self.members = [trained[i][0] for i in best]
        self.member_seeds = [seeds[i] for i in best]
        self.val_losses = [trained[i][1] for i in best]
        return self

    def _train_one(self, t: dict, seed: int) -> tuple[SharedTrunkNet, float, int]:
        cfg = self.config
        torch.manual_seed(seed)
        shuffler = torch.Generator().manual_seed(seed)
        net = SharedTrunkNet(self.in_dim, self.n_targets, cfg.hidden, cfg.dropout)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        n = len(t["Xtr"])
        best_loss, best_state, best_epoch, stale = math.inf, None, 0, 0
        for epoch in range(cfg.max_epochs):
            net.train()
            perm = torch.randperm(n, generator=shuffler)
            for start in range(0, n, cfg.batch_size):
                idx = perm[start:start + cfg.batch_size]
                loss = masked_bce(net(t["Xtr"][idx]), t["Ytr"][idx], t["Mtr"][idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                val_loss = float(masked_bce(net(t["Xva"]), t["Yva"], t["Mva"]))
            if val_loss < best_loss:
                best_loss, best_epoch, stale = val_loss, epoch + 1, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        net.load_state_dict(best_state)
        net.eval()
        return net, best_loss, best_epoch

    # -- inference -----------------------------------------------------------------------------------
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if not self.members:
            raise ConfigError("the SharedTrunkNet ensemble is not fitted; call fit() first")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.in_dim:
            raise DataError(f"X must be [N, {self.in_dim}], got {X.shape}")
        # The members' weights stacked: three batched matmuls instead of ~40 torch module calls, which keeps
        # routing one prompt far under a millisecond (dropout is off at inference). Plain torch tensor ops, not
        # NumPy: after an encoder forward NumPy's BLAS threads would contend with torch's still-spinning ones.
        if not X.flags.writeable:
            X = X.copy()
        layers = self._stacked_layers()
        with torch.inference_mode():
            h = torch.from_numpy(X)
            for i, (W, b) in enumerate(layers):
                h = torch.matmul(h, W) + b                # [M, N, out] (broadcast over members)
                if i < len(layers) - 1:
                    h = torch.relu(h)
            return torch.sigmoid(h.double()).mean(dim=0).numpy()

    def _stacked_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(W [M, in, out], b [M, 1, out])] per Linear layer, stacked over members; rebuilt when they change."""
        cached = getattr(self, "_stack_of", None)
        if cached is None or len(cached) != len(self.members) or any(a is not b for a, b in zip(cached, self.members)):
            linears = [[m for m in net.modules() if isinstance(m, nn.Linear)] for net in self.members]
            with torch.no_grad():
                self._stack = [(torch.stack([lin[i].weight.detach().T for lin in linears]).float().contiguous(),
                                torch.stack([lin[i].bias.detach()[None, :] for lin in linears]).float().contiguous())
                               for i in range(len(linears[0]))]
            self._stack_of = list(self.members)
        return self._stack

    # -- persistence as plain arrays -------------------------------------------------------------------
    def state_arrays(self, prefix: str = "trunk.") -> dict[str, np.ndarray]:
        out = {}
        for i, net in enumerate(self.members):
            for name, value in net.state_dict().items():
                out[f"{prefix}{i}.{name}"] = value.detach().numpy().copy()
        return out

    def meta(self) -> dict:
        return {"config": self.config.model_dump(mode="json"), "in_dim": self.in_dim, "n_targets": self.n_targets,
                "member_seeds": self.member_seeds, "val_losses": self.val_losses,
                "all_val_losses": self.all_val_losses, "epochs": self.epochs}

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray], prefix: str = "trunk.") -> TrunkEnsemble:
        try:
            ens = cls(TrunkConfig.parse(meta["config"]))
            ens.in_dim, ens.n_targets = int(meta["in_dim"]), int(meta["n_targets"])
            ens.member_seeds = list(meta["member_seeds"])
            ens.val_losses = list(meta.get("val_losses", []))
            ens.all_val_losses = list(meta.get("all_val_losses", []))
            ens.epochs = list(meta.get("epochs", []))
        except (KeyError, TypeError, ConfigError) as exc:
            raise CheckpointError(f"SharedTrunkNet metadata is invalid: {exc}") from exc
        for i in range(len(ens.member_seeds)):
            net = SharedTrunkNet(ens.in_dim, ens.n_targets, ens.config.hidden, ens.config.dropout)
            names = list(net.state_dict().keys())
            try:
                state = {name: torch.from_numpy(np.array(arrays[f"{prefix}{i}.{name}"])) for name in names}
                net.load_state_dict(state)
            except KeyError as exc:
                raise CheckpointError(f"SharedTrunkNet member {i}: tensor {exc.args[0]!r} is missing") from exc
            except RuntimeError as exc:
                raise CheckpointError(f"SharedTrunkNet member {i}: tensors do not fit the network: {exc}") from exc
            net.eval()
            ens.members.append(net)
        return ens
