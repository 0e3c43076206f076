"""Shared test fixtures. Tests run offline on CPU: no hub downloads, tiny random models built here."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# Tests never write outside a temporary folder. Every cache a run could fill (ours, Hugging Face's, matplotlib's,
# any XDG one) points into one folder per test session. It is set here, at import, because transformers and
# matplotlib read these variables when they are first imported, and Ray workers inherit the environment. One
# folder for the whole session, so the default encoder is de-quantized at most once per run.
TEST_CACHE = Path(tempfile.mkdtemp(prefix="prefill-router-tests-"))
CACHE_VARIABLES = {"PREFILL_ROUTER_CACHE": "prefill-router", "HF_HOME": "huggingface",
                   "XDG_CACHE_HOME": "xdg-cache", "MPLCONFIGDIR": "matplotlib"}
os.environ.update({var: str(TEST_CACHE / sub) for var, sub in CACHE_VARIABLES.items()})


@pytest.fixture(scope="session")
def _test_cache_folder():
    yield TEST_CACHE
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_cache(_test_cache_folder, monkeypatch) -> Path:
    """Used by every test: the cache variables point into this session's temporary folder (set again for each
    test, so one test that changes them cannot leak into the next). Returns $PREFILL_ROUTER_CACHE."""
    for var, sub in CACHE_VARIABLES.items():
        monkeypatch.setenv(var, str(_test_cache_folder / sub))
    return _test_cache_folder / "prefill-router"


@pytest.fixture(scope="module")
def upstream_names() -> list[str]:
    """The fake upstreams `upstreams` starts; a test module overrides this fixture to name others."""
    from gateway_helpers import TARGETS

    return list(TARGETS)


@pytest.fixture(scope="module")
def _running_upstreams(upstream_names):
    """The servers behind `upstreams`, started once per test module (one per test would cost a port and a
    thread each)."""
    from gateway_helpers import running_upstreams

    with running_upstreams(upstream_names) as started:
        yield started


@pytest.fixture
def upstreams(_running_upstreams):
    """{name: FakeUpstream}: real OpenAI-compatible HTTP servers on 127.0.0.1, one per `upstream_names`, fresh
    for each test: no scripted behaviours or recorded requests left by the test before, and each answers
    "answer from <name>" by default. (A module that defines its own `upstreams` fixture replaces all this.)"""
    from gateway_helpers import reset_upstreams

    reset_upstreams(_running_upstreams)
    return _running_upstreams


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The routing data shipped with the package (MMLU-Pro, RouteLLM): always present."""
    from prefill_router.data.builtin import SHIPPED_DATA

    return SHIPPED_DATA


@pytest.fixture(scope="session")
def reference_features() -> Path:
    """The precomputed SmolLM2 reference features of MMLU-Pro (an optional accelerator, not shipped); tests
    that compare against them are skipped where no `shared/data` beside the clone holds them."""
    from prefill_router.data.builtin import REFERENCE_FEATURES, find_reference_features

    folder = find_reference_features(Path(__file__).resolve().parents[2] / "shared" / "data")
    if folder is None:
        pytest.skip(f"reference features ({REFERENCE_FEATURES}) not found beside the clone")
    return folder


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_bpe_tokenizer(special: list[str], role_words: str):
    """A byte-level BPE tokenizer (vocabulary 300) trained here on a few sentences, with these special tokens
    and the words a prompt template writes (`role_words`) in its corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "what is the capital of france? A. paris B. rome",
              f"{role_words} question answer option", "0123456789 + - * / = ( ) . , ? !"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def make_tiny_encoder(folder: Path, *, layers: int = 2, hidden: int = 32, max_positions: int = 128,
                      seed: int = 0) -> Path:
    """Save a tiny randomly initialised Llama and a real (locally trained) tokenizer with a chat template.

    Loading it goes through the same code path as any Hugging Face folder.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_bpe_tokenizer(["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"], "user assistant system")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<|im_start|>", eos_token="<|im_end|>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.model_max_length = max_positions
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, pad_token_id=fast.pad_token_id,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 32, context 128) with a chat-template tokenizer, saved to disk."""
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    """The tiny encoder loaded through the real loading code (a module may define its own `encoder`)."""
    from prefill_router.features import load_encoder

    return load_encoder(str(tiny_encoder_dir))


@pytest.fixture(scope="module")
def checkpoint(encoder, tmp_path_factory):
    """A tiny router on `encoder` over the gateway tests' three priced targets (gateway_helpers), saved."""
    from gateway_helpers import train_tiny_router

    return train_tiny_router(encoder, tmp_path_factory.mktemp("router"))
