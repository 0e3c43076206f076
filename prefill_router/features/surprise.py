"""The encoder's own surprise at a prompt, as a feature source: the `surprise` pooling.

From the same forward pass that gives the hidden states, the encoder's language-model head predicts each next
prompt token; the negative log-likelihood (NLL, nats) of the token that actually follows, over every position of
the templated prompt, is summarised per prompt by SURPRISE_STATS: its mean, standard deviation, maximum and
quantiles, the mean entropy of the predicted distribution, and log(1 + tokens). A prompt the small model finds
hard to predict (rare notation, long derivations, unusual wording) may be one the targets find hard too; the
statistics are cheap next to the hidden states (ten numbers, no PCA needed).

The LM head reads the final hidden state, so this pooling runs every decoder layer (no early exit). In a
feature store it is held at the last hidden-state index, with SURPRISE_STATS as its width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SURPRISE = "surprise"
SURPRISE_STATS = ("nll_mean", "nll_std", "nll_max", "nll_q10", "nll_q25", "nll_q50", "nll_q75", "nll_q90",
                  "entropy_mean", "log_tokens")
_QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
# Positions whose logits are computed at once: SmolLM2's 49,152-word vocabulary at float32 is 200 KB per
# position, so 512 positions bound the transient memory at about 100 MB whatever the batch.
_CHUNK = 512


def pooling_width(pooling: str, hidden_size: int) -> int:
    """The last axis of a pooling's features: the hidden size, or the number of surprise statistics."""
    return len(SURPRISE_STATS) if pooling == SURPRISE else hidden_size


def surprise_stats(head: Callable[[torch.Tensor], torch.Tensor], final: torch.Tensor, input_ids: torch.Tensor,
                   mask: torch.Tensor) -> np.ndarray:
    """float32 [b, 1, len(SURPRISE_STATS)] for a padded batch.

    head: the model's output embeddings (hidden -> vocabulary logits); final: the final hidden state [b, T, H];
    input_ids, mask: [b, T] (left or right padding; padded positions never enter a statistic)."""
    import torch  # the feature store imports pooling_width without loading torch

    out = np.zeros((len(final), 1, len(SURPRISE_STATS)), dtype=np.float32)
    for row in range(len(final)):
        real = torch.nonzero(mask[row]).squeeze(1)
        ids, states = input_ids[row, real], final[row, real]
        nll, entropy = [], []
        for start in range(0, len(ids) - 1, _CHUNK):  # position t predicts token t + 1
            end = min(start + _CHUNK, len(ids) - 1)
            logp = torch.log_softmax(head(states[start:end]).float(), dim=-1)
            nll.append(-logp.gather(1, ids[start + 1:end + 1, None]).squeeze(1))
            entropy.append(-(logp.exp() * logp).sum(-1))
        out[row, 0, -1] = np.log1p(len(ids))
        if not nll:  # a one-token prompt predicts nothing: zeros, with its length
            continue
        x, h = torch.cat(nll).double(), torch.cat(entropy).double()
        q = torch.quantile(x, torch.tensor(_QUANTILES, dtype=torch.float64, device=x.device))
        out[row, 0, :-1] = torch.cat([torch.stack([x.mean(), x.std(unbiased=False), x.max()]), q,
                                      h.mean()[None]]).cpu().numpy()
    return out
