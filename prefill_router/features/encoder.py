"""The encoder: one prefill pass of a causal LM over each prompt, pooled at every hidden state.

Loading (which model, its files, GGUF conversion, identity, number format) is `features/loading.py`; this module
runs a loaded model. The loading side's public names are re-exported here, so `from
prefill_router.features.encoder import Encoder, EncoderSpec, load_encoder` keeps working.

Hidden states: index 0 is the embedding output, index l the output of decoder layer l; the last one is after
the model's final norm, as transformers returns it. `num_hidden_states` = layers + 1. Early exit: a call that
wants no state past l runs only the first l decoder layers (the results are the same as a full pass).

Poolings, both exact under left and right padding (padding never enters a result):
- `mean`: average over every token of the templated prompt, template tokens included;
- `last`: the last prompt token (with the chat template, the end of the generation prompt);
- `surprise` (asked for by name): statistics of the encoder's own next-token loss over the prompt
  (features/surprise.py). It reads the final state, so a call that asks for it runs every layer; its array
  is [N, 1, len(SURPRISE_STATS)] whatever `layers` says.

Truncation rule (documented and counted): a prompt longer than `max_tokens` keeps its first
`max_tokens // 2` tokens and its last `max_tokens - max_tokens // 2` tokens; the middle is dropped. Keeping
both ends keeps the template's opening turn and its generation prompt, which the `last` pooling reads.
`max_tokens` defaults to the encoder's context length.

Batching sorts prompts by length and fills each batch up to a token budget (batch size x longest prompt),
so little compute goes to padding. Results come back in input order. Prefix reuse (features/prefix_cache.py)
runs only the new tokens of a prompt whose prefix was seen before.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from prefill_router.errors import ConfigError, EncoderError
from prefill_router.features.loading import (  # noqa: F401  (re-exported: features.encoder's public names)
    ALIAS_TEMPLATES,
    ASSEMBLED_ENCODERS,
    BUILTIN_ENCODERS,
    DEFAULT_ENCODER,
    ENCODER_ALIASES,
    FLOAT_LINEARS,
    IDENTITY_FILE_PATTERNS,
    QUANTIZE_RULES,
    TRUNCATION_RULE,
    EncoderSpec,
    Resolved,
    assembled_gguf,
    cache_dir,
    converted_gguf_folder,
    load_encoder,
    resolve,
)
from prefill_router.features.prefix_cache import BLOCK, PrefixCache, PrefixHit, sums_at_blocks
from prefill_router.features.surprise import SURPRISE, pooling_width, surprise_stats
from prefill_router.features.template import render
from prefill_router.progress import TokenBar

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "last")  # the defaults; `surprise` (features/surprise.py) is asked for by name
# Token budget per batch (batch size x longest prompt in it). On CPU batching barely raises throughput (a
# single 200-token prompt already keeps the matmuls busy), so a small budget keeps padding near zero.
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "cuda": 32768, "mps": 8192}
MAX_BATCH_SIZE = 256


def set_cpu_threads(threads: int | None = None) -> int:
    """Give torch `threads` CPU threads (None: every core this process may use) and return the number.

    torch's own default counts the machine's cores, not the ones a container or `taskset` allows, and more
    threads than cores makes every forward wait on the scheduler. The Rust tokenizer's thread pool is turned
    off (TOKENIZERS_PARALLELISM) because the gateway tokenizes a few prompts at a time next to the forward."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads or available
    if threads > available:
        logger.warning("threads: %d torch threads on %d usable cores oversubscribes them", threads, available)
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return threads


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_batch_size: int = MAX_BATCH_SIZE) -> list[np.ndarray]:
    """Group prompt indices into batches: longest first, each batch filled while
    (batch size x its longest prompt) stays within `batch_tokens`. A prompt longer than the budget runs alone."""
    sizes = np.asarray(lengths)
    order = np.argsort(-sizes, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(sizes[order[start]])
        size = max(1, min(max_batch_size, batch_tokens // max(longest, 1)))
        batches.append(order[start:start + size])
        start += size
    return batches


def tokenize_prompts(prompts: Sequence[Any], tokenizer: PreTrainedTokenizerBase, template: str,
                     window: bool = False) -> list[list[int]]:
    """Token ids of each prompt rendered with `template` (of its routing window only, with `window`), before
    truncation: what the encoder reads, and what the token-embedding mean (features/embedding_mean.py) averages."""
    prompts = _as_prompt_list(prompts)
    rendered = [render(p, tokenizer, template, row=i, window=window) for i, p in enumerate(prompts)]
    ids: list[list[int]] = [None] * len(rendered)  # type: ignore[list-item]
    for special in (False, True):
        rows = [i for i, (_, add) in enumerate(rendered) if add is special]
        if rows:
            encoded = tokenizer([rendered[i][0] for i in rows], add_special_tokens=special)["input_ids"]
            for i, row_ids in zip(rows, encoded):
                ids[i] = list(row_ids)
    for i, row_ids in enumerate(ids):
        if not row_ids:
            raise EncoderError(f"prompt at row {i} is empty after tokenization")
    return ids


def truncate(ids: list[int], max_tokens: int) -> list[int]:
    """The documented rule: keep the first max_tokens // 2 and the last max_tokens - max_tokens // 2 tokens."""
    if len(ids) <= max_tokens:
        return ids
    head = max_tokens // 2
    return ids[:head] + ids[len(ids) - (max_tokens - head):]


class Encoder:
    """A loaded encoder. Use `encode(prompts)`; see the module docstring for poolings and truncation."""

    def __init__(self, spec: EncoderSpec, tokenizer: PreTrainedTokenizerBase | None, model: PreTrainedModel,
                 resolved: Resolved | None, number_format: tuple[str, str] | None = None):
        self.spec, self.tokenizer, self.model, self._resolved = spec, tokenizer, model, resolved
        config = model.config
        self.num_hidden_states = int(config.num_hidden_layers) + 1
        self.hidden_size = int(config.hidden_size)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # The number format it runs in (features/formats.py) and why: load_encoder says; a model handed in is
        # read by its weights' dtype.
        self.number_format, self.format_reason = number_format or (
            {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32"), "the model's weights")
        self.context_length = self._context_length()
        if spec.max_tokens is not None and spec.max_tokens > self.context_length:
            raise ConfigError(f"max_tokens: {spec.max_tokens} exceeds the context length of {spec.model!r} "
                              f"({self.context_length} tokens)")
        self.max_tokens = min(spec.max_tokens or self.context_length, spec.max_route_tokens or self.context_length)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None) or 0
        self._pad_id = int(pad)  # any id works: padded positions are masked out and never pooled
        # Diagnostics of the calling thread's latest encode/iter_batches call (see last_truncated): per
        # thread, so that concurrent callers (the gateway's workers) never read each other's numbers.
        self._calls = threading.local()
        self._identity: dict | None = None
        self.prefix_cache: PrefixCache | None = None

    def use_prefix_cache(self, max_mb: float | None) -> None:
        """Reuse the encoder state of prompt prefixes seen before (features/prefix_cache.py), keeping at most
        `max_mb` MB of it; 0 or None turns reuse off. The features are the same within float rounding, so
        this is not part of the identity. Models with sliding-window attention are left without reuse."""
        if not max_mb:
            self.prefix_cache = None
            return
        if getattr(self.model.config, "sliding_window", None):
            logger.warning("prefix reuse is off for %s: its sliding-window attention keeps a bounded cache",
                           self.spec.model)
            self.prefix_cache = None
            return
        self.prefix_cache = PrefixCache(int(max_mb * 2**20))

    def with_route_window(self, max_route_tokens: int | None) -> Encoder:
        """This encoder reading only the routing window of `max_route_tokens` tokens: the same model and
        tokenizer (nothing is loaded again), with the window in its spec."""
        spec = self.spec.model_copy(update={"max_route_tokens": max_route_tokens})
        return Encoder(spec, self.tokenizer, self.model, self._resolved, (self.number_format, self.format_reason))

    def _prefix_cache_for(self, poolings: Sequence[str]) -> PrefixCache | None:
        # Surprise needs the logits of every prompt position, which a cached prefix does not keep.
        return self.prefix_cache if SURPRISE not in poolings else None

    @property
    def last_truncated(self) -> int:
        """Prompts truncated by this thread's latest encode/iter_batches call."""
        return getattr(self._calls, "truncated", 0)

    @property
    def last_token_counts(self) -> np.ndarray:
        """Each prompt's templated length before truncation, of this thread's latest call."""
        return getattr(self._calls, "token_counts", np.zeros(0, dtype=np.int64))

    def _context_length(self) -> int:
        config = self.model.config
        limits: list[int] = [getattr(config, name) for name in ("max_position_embeddings", "n_positions", "seq_length")
                  if isinstance(getattr(config, name, None), int)]
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 10**7:
            limits.append(tokenizer_limit)
        if not limits:
            raise EncoderError(f"cannot tell the context length of {self.spec.model!r}; set max_tokens")
        return min(limits)

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None,
                   spec: EncoderSpec | None = None) -> Encoder:
        """Wrap a base model already in memory (e.g. random weights for benchmarks). Without a tokenizer,
        pass `token_ids` to `iter_batches`. Such an encoder has no identity (its files are unknown)."""
        return cls(spec or EncoderSpec(model=type(model).__name__), tokenizer, model.eval(), None)

    def identity(self) -> dict:
        if self._resolved is None:
            raise EncoderError("this encoder was built from a model in memory and has no file identity")
        if self._identity is None:
            self._identity = self._resolved.identity(self.spec)
        return self._identity

    def __repr__(self) -> str:
        return (f"Encoder({self.spec.model!r}, hidden_states={self.num_hidden_states}, hidden={self.hidden_size}, "
                f"template={self.spec.template!r}, device={self.device}, format={self.number_format})")

    # -- prompts to token ids -------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[Any]) -> list[list[int]]:
        """Token ids of each templated prompt, before truncation."""
        if self.tokenizer is None:
            raise EncoderError("this encoder has no tokenizer (Encoder.from_model without one): pass token_ids")
        window = self.spec.max_route_tokens is not None
        return tokenize_prompts(prompts, self.tokenizer, self.spec.template, window=window)

    def count_tokens(self, prompts: Sequence[Any]) -> np.ndarray:
        """Templated prompt length in tokens, before truncation."""
        return np.array([len(x) for x in self.tokenize(prompts)], dtype=np.int64)

    def resolve_layers(self, layers: Sequence[int] | str | None) -> list[int]:
        """Hidden-state indices (0 = embeddings); None or 'all' means every one; negatives count from the end."""
        n = self.num_hidden_states
        if layers is None or (isinstance(layers, str) and layers == "all"):
            return list(range(n))
        if isinstance(layers, str):
            raise EncoderError(f"layers: expected 'all' or a list of hidden-state indices, got {layers!r}")
        out = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -n <= layer < n:
                raise EncoderError(f"layers: {layer!r} is not a hidden-state index of {self.spec.model!r} "
                                   f"(0..{n - 1}, 0 = embeddings)")
            out.append(int(layer) % n)
        if len(set(out)) != len(out):
            raise EncoderError(f"layers: repeated hidden-state index in {list(layers)}")
        if not out:
            raise EncoderError("layers: empty selection")
        return out

    # -- forward --------------------------------------------------------------------------------------------

    def iter_batches(self, prompts: Sequence[Any], *, poolings: Sequence[str] = POOLINGS,
                     layers: Sequence[int] | str | None = None, batch_tokens: int | None = None,
                     progress: bool = False, token_ids: list[list[int]] | None = None,
                     ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield (row indices, {pooling: float32 [b, L, H]}) batch by batch, longest prompts first.

        `token_ids` (from `tokenize`) skips re-tokenizing when the caller already has them.
        """
        poolings = _check_poolings(poolings)
        layer_ids = self.resolve_layers(layers)
        ids = token_ids if token_ids is not None else self.tokenize(prompts)
        counts = np.array([len(x) for x in ids], dtype=np.int64)
        truncated = int((counts > self.max_tokens).sum())
        ids = [truncate(x, self.max_tokens) for x in ids]
        self._calls.token_counts, self._calls.truncated = counts, truncated
        if truncated:
            logger.warning("%d prompt(s) longer than %d tokens were truncated (rule: %s)", truncated,
                           self.max_tokens, TRUNCATION_RULE)
        budget = batch_tokens or DEFAULT_BATCH_TOKENS.get(self.device.type, 4096)
        lengths = [len(x) for x in ids]
        # Counted in tokens: batches run longest first, so a count of prompts would extrapolate the slowest ones.
        bar = TokenBar(sum(lengths), len(ids), desc="prefill") if progress else None
        # With prefix reuse, a prompt whose prefix is cached runs alone on top of that prefix; the others are
        # batched as usual and leave their own state in the cache.
        cache = self._prefix_cache_for(poolings)
        hits: dict[int, PrefixHit] = {}
        if cache is not None:
            for i, row_ids in enumerate(ids):
                hit = cache.lookup(row_ids, max(layer_ids))
                if hit is not None:
                    hits[i] = hit
        rest = np.array([i for i in range(len(ids)) if i not in hits], dtype=np.int64)
        work: list[tuple[np.ndarray, PrefixHit | None]] = [(np.array([i]), hit) for i, hit in hits.items()]
        work += [(rest[batch], None) for batch in plan_batches([lengths[i] for i in rest], budget)]
        try:
            for rows, hit in work:
                if hit is not None and cache is not None:  # (a hit comes from the cache)
                    pooled = self._forward_on_prefix(cache, ids[rows[0]], hit, poolings, layer_ids)
                else:
                    pooled = self._forward([ids[i] for i in rows], poolings, layer_ids)
                yield rows, pooled
                if bar is not None:
                    bar.advance(sum(lengths[i] for i in rows), len(rows))
        finally:
            if bar is not None:
                bar.close()

    def encode(self, prompts: Sequence[Any], *, poolings: Sequence[str] = POOLINGS,
               layers: Sequence[int] | str | None = None, batch_tokens: int | None = None,
               progress: bool = False) -> dict[str, np.ndarray]:
        """{pooling: float32 array [N, L, H]} in input order. `prompts`: strings and/or chat-message lists
        (a single string or a single message list is one prompt)."""
        prompts = _as_prompt_list(prompts)
        poolings = _check_poolings(poolings)
        layer_ids = self.resolve_layers(layers)
        out = {p: np.empty((len(prompts), 1 if p == SURPRISE else len(layer_ids), pooling_width(p, self.hidden_size)),
                           dtype=np.float32) for p in poolings}
        for rows, pooled in self.iter_batches(prompts, poolings=poolings, layers=layer_ids,
                                              batch_tokens=batch_tokens, progress=progress):
            for name in poolings:
                out[name][rows] = pooled[name]
        return out

    def _forward(self, batch: list[list[int]], poolings: Sequence[str], layer_ids: list[int]) -> dict[str, np.ndarray]:
        size, longest = len(batch), max(len(x) for x in batch)
        input_ids = torch.full((size, longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((size, longest), dtype=torch.bool)
        for i, row in enumerate(batch):
            span = slice(0, len(row)) if self.spec.padding_side == "right" else slice(longest - len(row), longest)
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = True
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        # Positions count real tokens only, so a left-padded prompt sees the same positions as alone.
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        final = self.num_hidden_states - 1
        deepest = final if SURPRISE in poolings else max(layer_ids)
        cache = self._prefix_cache_for(poolings)
        kv = _new_kv_cache() if cache is not None else None  # filled by the forward, for the prefixes kept
        with torch.inference_mode():
            hidden = self._hidden_states(input_ids, mask, positions, deepest, kv)
            if cache is not None and kv is not None:
                self._store_prefixes(cache, batch, mask, hidden, kv, deepest)
            lengths = mask.sum(-1)
            last = (torch.arange(longest, device=self.device) * mask).argmax(-1)  # last real token per row
            weights = (mask.float() / lengths[:, None].float()).unsqueeze(1)  # [b, 1, T]
            result: dict[str, list[torch.Tensor]] = {name: [] for name in poolings if name != SURPRISE}
            for layer in layer_ids:
                states = hidden[layer].float()
                if "mean" in result:
                    # masked_fill first: padded positions may hold anything, and 0 * nan is nan.
                    states_masked = states.masked_fill(~mask[..., None], 0.0)
                    result["mean"].append(torch.bmm(weights, states_masked).squeeze(1))
                if "last" in result:
                    result["last"].append(states[torch.arange(size, device=self.device), last])
            pooled = {name: torch.stack(parts, 1).cpu().numpy() for name, parts in result.items()}
            if SURPRISE in poolings:
                pooled[SURPRISE] = surprise_stats(self._lm_head(), hidden[final], input_ids, mask)
            return pooled

    def _forward_on_prefix(self, cache: PrefixCache, ids: list[int], hit: PrefixHit, poolings: Sequence[str],
                           layer_ids: list[int]) -> dict[str, np.ndarray]:
        """One prompt whose first `hit.tokens` tokens are cached: only the rest runs, attending to the cached
        keys and values; mean pooling adds the cached running sums."""
        from transformers import DynamicCache

        deepest, start, entry = max(layer_ids), hit.tokens, hit.entry
        kv = DynamicCache(ddp_cache_data=[(k[:, :, :start], v[:, :, :start]) for k, v in entry.kv[:deepest]])
        input_ids = torch.tensor([ids[start:]], dtype=torch.long, device=self.device)
        mask = torch.ones((1, len(ids)), dtype=torch.bool, device=self.device)  # the prefix and the new tokens
        positions = torch.arange(start, len(ids), device=self.device)[None]
        with torch.inference_mode():
            hidden = self._hidden_states(input_ids, mask, positions, deepest, kv)
            new = torch.stack([hidden[s][0].float() for s in range(deepest + 1)])  # [S, new tokens, H]
            before = entry.block_sums[:deepest + 1, hit.blocks - 1]  # [S, H]: sums over the cached prefix
            blocks = len(ids) // BLOCK - hit.blocks
            cache.store(ids, deepest, self._kv_of_row(kv, deepest, 0, 0, len(ids)), torch.cat(
                [entry.block_sums[:deepest + 1, :hit.blocks], sums_at_blocks(new, blocks, before)], 1))
            result: dict[str, torch.Tensor] = {}
            if "mean" in poolings:
                result["mean"] = ((before[layer_ids] + new[layer_ids].sum(1)) / len(ids))[None]
            if "last" in poolings:
                result["last"] = new[layer_ids, -1][None]
            return {name: result[name].cpu().numpy() for name in poolings}

    def _lm_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Final hidden state -> next-token logits. The encoder loads the base model, without its LM head: a
        model with tied embeddings (SmolLM2, Gemma 3) reads them back; another's head weight is read from its
        safetensors files once."""
        if getattr(self, "_head", None) is None:
            config = self.model.config
            text = getattr(config, "get_text_config", lambda: config)()
            if getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)):
                weight: torch.Tensor = self.model.get_input_embeddings().weight  # type: ignore[assignment]
            else:
                weight = self._untied_head_weight()
            cap = getattr(text, "final_logit_softcapping", None)

            def head(h: torch.Tensor) -> torch.Tensor:
                logits = torch.nn.functional.linear(h, weight.to(h.dtype))
                return logits if not cap else torch.tanh(logits / cap) * cap

            self._head = head
        return self._head

    def _untied_head_weight(self) -> torch.Tensor:
        from safetensors import safe_open

        folder = None if self._resolved is None else self._resolved.folder
        if self._resolved is not None and self._resolved.gguf_file is not None:
            folder = converted_gguf_folder(self._resolved)
        for path in sorted(Path(folder).glob("*.safetensors")) if folder is not None else []:
            with safe_open(str(path), framework="pt") as f:
                key = next((k for k in f.keys() if k.endswith("lm_head.weight")), None)
                if key is not None:
                    tensor: torch.Tensor = f.get_tensor(key)
                    return tensor.to(self.device)
        raise EncoderError(f"the surprise pooling needs the LM head of {self.spec.model!r}, and its files hold "
                           "no lm_head.weight (nor are its embeddings tied)")

    def _kv_of_row(self, kv: DynamicCache, deepest: int, row: int, start: int,
                   length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of one batch row's keys and values over its whole blocks (so the batch's tensors can go)."""
        from transformers.cache_utils import CacheLayerMixin

        end = start + length // BLOCK * BLOCK
        out = []
        for layer in kv.layers[:deepest]:
            # A dynamic cache's layers hold plain key and value tensors once a forward has filled them.
            if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
                raise EncoderError(f"prefix reuse: unexpected KV cache layer {type(layer).__name__}")
            out.append((layer.keys[row:row + 1, :, start:end].clone(), layer.values[row:row + 1, :, start:end].clone()))
        return out

    def _store_prefixes(self, cache: PrefixCache, batch: list[list[int]], mask: torch.Tensor,
                        hidden: Sequence[torch.Tensor], kv: DynamicCache, deepest: int) -> None:
        for row, row_ids in enumerate(batch):
            start = int(mask[row].long().argmax())  # first real token: 0 under right padding
            states = torch.stack([hidden[s][row, start:start + len(row_ids)].float() for s in range(deepest + 1)])
            cache.store(row_ids, deepest, self._kv_of_row(kv, deepest, row, start, len(row_ids)),
                                    sums_at_blocks(states, len(row_ids) // BLOCK))

    def _hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, deepest: int,
                       kv: DynamicCache | None = None) -> Sequence[torch.Tensor]:
        """Hidden states 0..deepest (index l = output of decoder layer l). Early exit: when no state past
        `deepest` is wanted, the forward stops after decoder layer `deepest`, so a router reading states up
        to 18 of SmolLM2's 30 runs 18 layers. The final state (after the model's last norm) needs every layer.

        `kv`: a KV cache holding the keys and values of tokens before `input_ids` (the mask covers them too);
        it is extended in place with those of `input_ids`."""
        layers = self._decoder_layers()
        cache = {"cache": kv, "use_cache": kv is not None}
        if layers is None or deepest >= len(layers):
            every: Sequence[torch.Tensor] = self.model(input_ids=input_ids, attention_mask=mask.long(),
                                                       position_ids=positions, output_hidden_states=True,
                                                       **cache).hidden_states
            return every
        capture = self._capture
        capture.states, capture.stop_after = [], deepest
        try:
            self.model(input_ids=input_ids, attention_mask=mask.long(), position_ids=positions, **cache)
        except _EarlyExit:
            pass
        finally:
            states: list[torch.Tensor] = capture.states
            capture.states = None
        if len(states) != deepest + 1:
            raise EncoderError(f"early exit captured {len(states)} hidden states, expected {deepest + 1}")
        return states

    def _decoder_layers(self) -> torch.nn.ModuleList | None:
        """The decoder's layer list with capture hooks installed once, or None when the model does not expose
        one (then every call runs the whole model)."""
        if not hasattr(self, "_capture"):
            decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
            layers = getattr(decoder, "layers", None)
            self._layers = layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None
            # Thread-local: the hooks stay installed, and only the calling thread's early-exit forward records.
            self._capture = threading.local()
            if self._layers is not None:
                self._layers[0].register_forward_pre_hook(self._record_input, with_kwargs=True)
                for index, layer in enumerate(self._layers, start=1):
                    layer.register_forward_hook(functools.partial(self._record_output, index))
        return self._layers

    def _record_input(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if getattr(self._capture, "states", None) is not None:
            self._capture.states.append(args[0] if args else kwargs["hidden_states"])
            if self._capture.stop_after == 0:  # the embeddings alone: no decoder layer runs
                raise _EarlyExit

    def _record_output(self, index: int, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        capture = self._capture
        if getattr(capture, "states", None) is None:
            return
        capture.states.append(output[0] if isinstance(output, tuple) else output)
        if index >= capture.stop_after:
            raise _EarlyExit


def _new_kv_cache() -> DynamicCache:
    """An empty KV cache, filled during a forward whose prefixes are kept."""
    from transformers import DynamicCache

    return DynamicCache()


class _EarlyExit(Exception):
    """Raised by the last wanted decoder layer's hook to stop the forward pass (see Encoder._hidden_states)."""


def _as_prompt_list(prompts: Any) -> list:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and isinstance(items[0], dict):
        return [items]  # one chat conversation
    return items


def _check_poolings(poolings: Sequence[str]) -> list[str]:
    if isinstance(poolings, str):
        poolings = [p.strip() for p in poolings.split(",") if p.strip()]
    poolings = list(dict.fromkeys(poolings))
    unknown = [p for p in poolings if p not in (*POOLINGS, SURPRISE)]
    if unknown or not poolings:
        raise EncoderError(f"poolings: unknown {unknown or 'empty selection'}; known: {', '.join(POOLINGS)}, "
                           f"{SURPRISE}")
    return poolings
