"""The token-embedding mean: hidden state 0 mean-pooled, computed without running the model.

Hidden state 0 is the embedding output, so its mean over a prompt's tokens is the mean of the input-embedding
rows of those tokens: a table lookup after tokenization, well under a millisecond for a 512-token prompt, with
no transformer layer run. The router's fallback scorer (router/fallback.py) reads it when the prefill cannot
answer in time. It reads exactly what the encoder reads: the same template, routing window and truncation, so
it equals the encoder's own `mean` pooling at hidden state 0 (up to float rounding).

An `EmbeddingMean` holds its own copy of the tokenizer and a read-only NumPy table, so one thread may call it
while another runs the encoder; a lock keeps two callers of the same instance from sharing its tokenizer.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prefill_router.errors import EncoderError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from prefill_router.features.encoder import Encoder


class EmbeddingMean:
    """prompts -> (mean input embedding [N, H] float32, templated length before truncation [N] int64)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, table: np.ndarray, *, template: str, window: bool,
                 max_tokens: int, scale: float = 1.0):
        self.tokenizer = copy.deepcopy(tokenizer)  # its own: the encoder's thread tokenizes with the original
        self.table = table  # [vocabulary, H] float32, never written
        self.template, self.window, self.max_tokens, self.scale = template, window, max_tokens, scale
        self._lock = threading.Lock()

    @classmethod
    def of(cls, encoder: Encoder, table: np.ndarray | None = None) -> EmbeddingMean:
        """The embedding mean of a loaded local encoder, reading its template, window and truncation. `table`: the
        encoder's input embeddings when the caller already holds them (`input_embeddings(encoder)`)."""
        from prefill_router.features.encoder import Encoder

        if not isinstance(encoder, Encoder):
            raise EncoderError(f"the token-embedding mean needs a local encoder's tokenizer and embeddings; "
                               f"{type(encoder).__name__} has neither")
        if encoder.tokenizer is None:
            raise EncoderError("the token-embedding mean needs the encoder's tokenizer (Encoder.from_model had none)")
        return cls(encoder.tokenizer, input_embeddings(encoder) if table is None else table,
                   template=encoder.spec.template, window=encoder.spec.max_route_tokens is not None,
                   max_tokens=encoder.max_tokens, scale=embedding_scale(encoder))

    @property
    def hidden_size(self) -> int:
        return int(self.table.shape[1])

    def __call__(self, prompts: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        from prefill_router.features.encoder import tokenize_prompts, truncate

        with self._lock:
            ids = tokenize_prompts(prompts, self.tokenizer, self.template, window=self.window)
        counts = np.array([len(row) for row in ids], dtype=np.int64)
        out = np.empty((len(ids), self.hidden_size), dtype=np.float32)
        for i, row in enumerate(ids):
            out[i] = self.table[np.asarray(truncate(row, self.max_tokens))].mean(0, dtype=np.float32)
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return out, counts


def embedding_scale(encoder: Encoder) -> float:
    """The factor the model's embedding layer multiplies its rows by (Gemma: the square root of the hidden size),
    applied to the mean rather than to the whole table."""
    scale = getattr(encoder.model.get_input_embeddings(), "embed_scale", None)
    return 1.0 if scale is None else float(scale)


def input_embeddings(encoder: Encoder) -> np.ndarray:
    """The encoder's input-embedding table [vocabulary, H] as float32 NumPy. A float32 model's own weights are
    shared, not copied; a model loaded in another format (bf16, say) reads the table from its files instead,
    so the mean is the one float32 features were trained on."""
    import torch

    module = encoder.model.get_input_embeddings()
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise EncoderError(f"{encoder.spec.model!r}: its input embeddings hold no weight table")
    if weight.dtype == torch.float32:
        return weight.detach().cpu().numpy()
    name = next((n for n, p in encoder.model.named_parameters() if p is weight), "embed_tokens.weight")
    return _table_from_files(encoder, name)


def _table_from_files(encoder: Encoder, name: str) -> np.ndarray:
    from safetensors import safe_open

    from prefill_router.features.encoder import converted_gguf_folder

    resolved = encoder._resolved
    if resolved is None:
        raise EncoderError("the token-embedding mean of a model not loaded from files needs float32 weights")
    folder = converted_gguf_folder(resolved) if resolved.gguf_file is not None else resolved.folder
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            key = next((k for k in f.keys() if k == name or k.endswith("." + name)), None)
            if key is not None:
                table: np.ndarray = f.get_tensor(key).float().numpy()
                return table
    raise EncoderError(f"{encoder.spec.model!r}: no {name} in the safetensors files of {folder}")
