"""The token-embedding mean: hidden state 0 mean-pooled, computed without running the model.

Hidden state 0 is the embedding output, so its mean over a prompt's tokens is the mean of the input-embedding
rows of those tokens: a table lookup after tokenization, well under a millisecond for a 512-token prompt, with
no transformer layer run. The router's fallback scorer (router/fallback.py) reads it when the prefill cannot
answer in time. It reads exactly what the encoder reads: the same template, routing window and truncation, so
it equals the encoder's own `mean` pooling at hidden state 0 (up to float rounding).

An `EmbeddingMean` holds its own copy of the tokenizer and a read-only NumPy table, so one thread may call it
while another runs the encoder; a lock keeps two callers of the same instance from sharing its tokenizer.

Its cost is tokenization. For a byte-level BPE tokenizer (SmolLM2's, GPT-2's) `ByteLevelWords` gives the same ids
as the Rust tokenizer about three times faster: it splits the text into the same pre-tokens and keeps each
pre-token's ids, so a word seen before costs one dictionary lookup. The cost is also bounded the way the routing
window bounds the encoder's: a rendered prompt
longer than LONG_CHARS_PER_TOKEN characters per window token is not tokenized whole. Only a head and a tail
piece are, each cut where a whitespace run starts, which is a pre-token boundary of a byte-level BPE tokenizer
(SmolLM2's, GPT-2's): their tokens are exactly the whole text's first and last tokens, and the truncation rule
keeps no others. The count of tokens in between (for the cost estimate) is then extrapolated from the pieces'
characters per token. Tokenizers of other kinds, and templates that add special tokens, tokenize the whole text.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prefill_router.errors import EncoderError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

    from prefill_router.features.encoder import Encoder

# A rendered prompt longer than this many characters per window token is read as a head and a tail piece; each
# piece starts with this many characters per token it must yield (doubled while it yields too few). Text runs
# 3-5 characters per token; a piece that still falls short after a few doublings means the whole text is read.
LONG_CHARS_PER_TOKEN = 6
PIECE_CHARS_PER_TOKEN = 5
_WHITESPACE_START = re.compile(r"(?<=\S)\s")  # where a whitespace run starts: a pre-token boundary


class EmbeddingMean:
    """prompts -> (mean input embedding [N, H] float32, templated length before truncation [N] int64)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, table: np.ndarray, *, template: str, window: bool,
                 max_tokens: int, scale: float = 1.0):
        self.tokenizer = copy.deepcopy(tokenizer)  # its own: the encoder's thread tokenizes with the original
        self.table = table  # [vocabulary, H] float32, never written
        self.template, self.window, self.max_tokens, self.scale = template, window, max_tokens, scale
        self._lock = threading.Lock()
        # The Rust tokenizer itself, without the Python wrapper's per-call work, where it has one; the bounded
        # reading of long prompts only where its pieces are exact (a byte-level BPE without a normalizer).
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._backend: Any = backend
        self._pieces_exact = backend is not None and backend.normalizer is None and \
            type(backend.pre_tokenizer).__name__ == "ByteLevel"
        self._words = ByteLevelWords.of(backend) if backend is not None else None

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
        from prefill_router.features.encoder import _as_prompt_list, tokenize_prompts

        prompts = _as_prompt_list(prompts)
        out = np.empty((len(prompts), self.hidden_size), dtype=np.float32)
        counts = np.empty(len(prompts), dtype=np.int64)
        with self._lock:
            if self._backend is None:  # a slow (Python) tokenizer: the encoder's own path
                rows = [(row, len(row)) for row in tokenize_prompts(prompts, self.tokenizer, self.template,
                                                                    window=self.window)]
            else:
                rows = [self._read(prompt, i) for i, prompt in enumerate(prompts)]
        for i, (ids, count) in enumerate(rows):
            out[i] = self.table[np.asarray(ids)].mean(0, dtype=np.float32)
            counts[i] = count
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return out, counts

    def _read(self, prompt: Any, row: int) -> tuple[list[int], int]:
        """(the token ids the encoder keeps, the templated length before truncation) of one prompt."""
        from prefill_router.features.encoder import truncate
        from prefill_router.features.template import render

        assert self._backend is not None
        text, special = render(prompt, self.tokenizer, self.template, row=row, window=self.window)
        head = self.max_tokens // 2
        if self._pieces_exact and not special and len(text) > LONG_CHARS_PER_TOKEN * self.max_tokens:
            pieces = self._head_and_tail(text, head, self.max_tokens - head)
            if pieces is not None:
                return pieces
        ids = self._encode(text, special)
        if not ids:
            raise EncoderError(f"prompt at row {row} is empty after tokenization")
        return truncate(ids, self.max_tokens), len(ids)

    def _encode(self, text: str, special: bool) -> list[int]:
        assert self._backend is not None
        if self._words is not None and not special:
            return self._words(text)
        # encode_batch_fast skips the character offsets, which nothing here reads: about a fifth faster.
        fast = getattr(self._backend, "encode_batch_fast", None)
        if fast is not None:
            ids: list[int] = fast([text], add_special_tokens=special)[0].ids
            return ids
        return list(self._backend.encode(text, add_special_tokens=special).ids)

    def _head_and_tail(self, text: str, head: int, tail: int) -> tuple[list[int], int] | None:
        """The first `head` and last `tail` tokens of a long text from two pieces of it, and the estimated
        length; None when a piece cannot be cut at whitespace or yields too few tokens (then read it whole)."""
        chars = PIECE_CHARS_PER_TOKEN * max(head, tail)
        for _ in range(4):
            if 2 * chars >= len(text):
                return None
            cut_head = _last_boundary(text, chars)
            cut_tail = _first_boundary(text, len(text) - chars)
            if cut_head is None or cut_tail is None or cut_tail <= cut_head:
                return None
            first, last = self._encode(text[:cut_head], False), self._encode(text[cut_tail:], False)
            if len(first) >= head and len(last) >= tail:
                read = cut_head + len(text) - cut_tail
                middle = (cut_tail - cut_head) * (len(first) + len(last)) / read  # tokens per character
                return first[:head] + last[len(last) - tail:], len(first) + len(last) + round(middle)
            chars *= 2
        return None


class ByteLevelWords:
    """Token ids of a byte-level BPE tokenizer without a normalizer, computed as it computes them (added tokens
    split out, the GPT-2 pre-token pattern, bytes mapped to characters, the BPE model on each pre-token), with
    each pre-token's ids kept: a prompt's words were nearly all seen before, and a dictionary lookup is far
    cheaper than the Rust tokenizer's whole pipeline on a few hundred tokens. `of` makes one only for a tokenizer
    of exactly this kind whose ids it reproduces on a sample text; the ids are the same (tested)."""

    # tokenizers' ByteLevel pre-tokenizer pattern (GPT-2's)
    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    MAX_WORDS = 200_000  # pre-tokens kept (a few MB); then the cache starts again
    SAMPLE = "Hello  world!\n\n  It's 2,048 tokens\t— café, naïve 日本語 😀 x=1;  \n end "

    def __init__(self, backend: Tokenizer):
        import regex  # \p{L} and \p{N}, which `re` lacks (transformers depends on it too)

        self._model = backend.model
        added = {token.content: index for index, token in backend.get_added_tokens_decoder().items()}
        self._added = added
        longest_first = sorted(added, key=len, reverse=True)  # leftmost-longest, as the Rust tokenizer matches
        self._split = regex.compile("(" + "|".join(regex.escape(a) for a in longest_first) + ")") if added else None
        self._words = regex.compile(self.PATTERN)
        self._bytes = str.maketrans(_byte_characters())
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def of(cls, backend: Tokenizer) -> ByteLevelWords | None:
        pre, model = backend.pre_tokenizer, backend.model
        plain = backend.normalizer is None and type(pre).__name__ == "ByteLevel" and \
            not pre.add_prefix_space and pre.use_regex and type(model).__name__ == "BPE" and model.dropout is None
        added = backend.get_added_tokens_decoder().values()
        if not plain or any(a.lstrip or a.rstrip or a.single_word for a in added):
            return None
        try:
            import regex  # noqa: F401
        except ImportError:
            return None
        words = cls(backend)
        sample = cls.SAMPLE + "".join(a.content for a in list(added)[:3])
        return words if words(sample) == backend.encode(sample, add_special_tokens=False).ids else None

    def __call__(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        if len(cache) > self.MAX_WORDS:
            cache.clear()
        for part in self._split.split(text) if self._split is not None else (text,):
            if part in self._added:
                ids.append(self._added[part])
                continue
            for word in self._words.findall(part):
                found = cache.get(word)
                if found is None:
                    mapped = word.encode("utf-8").decode("latin-1").translate(self._bytes)
                    found = cache[word] = [token.id for token in self._model.tokenize(mapped)]
                ids.extend(found)
        return ids


def _byte_characters() -> dict[str, str]:
    """Byte-level BPE's byte -> character map (GPT-2's bytes_to_unicode), keyed by the Latin-1 character of each
    byte: printable bytes stand for themselves, the others for characters from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): chr(b) for b in printable}, **{chr(b): chr(256 + i) for i, b in enumerate(others)}}


def _last_boundary(text: str, end: int) -> int | None:
    """The last position <= end where a whitespace run starts (its text before ends a pre-token)."""
    found = None
    for match in _WHITESPACE_START.finditer(text, max(1, end // 2), end + 1):
        found = match.start()
    return found


def _first_boundary(text: str, start: int) -> int | None:
    """The first position >= start where a whitespace run starts."""
    match = _WHITESPACE_START.search(text, max(1, start))
    return None if match is None else match.start()


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
