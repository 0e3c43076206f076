"""The encoder on a tiny random Llama, loaded through the real loading code, checked against per-prompt
forwards computed here directly with transformers (no batching, no padding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefill_router.errors import ConfigError, EncoderError
from prefill_router.features import EncoderSpec, load_encoder
from prefill_router.features.encoder import plan_batches, truncate

PROMPTS = [
    "what is the capital of france?",
    "the quick brown fox jumps over the lazy dog " * 3,
    "A. paris B. rome",
    [{"role": "system", "content": "answer the question"}, {"role": "user", "content": "1 + 1 = ?"}],
    "0123456789 + - * / = ( ) . , ? ! question answer option " * 2,
]


def reference_features(folder, prompts, template="chat"):
    """Per-prompt forward with plain transformers: one prompt per call, no padding."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    means, lasts, lengths = [], [], []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
        if template == "chat":
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = tok(p, add_special_tokens=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        means.append(torch.stack([h[0].mean(0) for h in hs]).numpy())
        lasts.append(torch.stack([h[0, -1] for h in hs]).numpy())
        lengths.append(ids.shape[1])
    return np.stack(means), np.stack(lasts), lengths


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_pooling_matches_single_prompt_reference(tiny_encoder_dir, side):
    enc = load_encoder(str(tiny_encoder_dir), padding_side=side)
    ref_mean, ref_last, lengths = reference_features(tiny_encoder_dir, PROMPTS)
    assert len(set(lengths)) > 2, "prompts must differ in length so the batch holds padding"
    out = enc.encode(PROMPTS, batch_tokens=10_000)  # one batch: every prompt but the longest is padded
    assert out["mean"].shape == (len(PROMPTS), enc.num_hidden_states, enc.hidden_size) == ref_mean.shape
    assert out["mean"].dtype == np.float32
    np.testing.assert_allclose(out["mean"], ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["last"], ref_last, rtol=1e-4, atol=1e-5)
    # Tiny budgets (one prompt per batch) give the same numbers, in input order.
    small = enc.encode(PROMPTS, batch_tokens=1)
    np.testing.assert_allclose(small["last"], out["last"], rtol=1e-4, atol=1e-5)


def test_encoder_properties_and_layer_selection(tiny_encoder_dir):
    enc = load_encoder(EncoderSpec(model=str(tiny_encoder_dir)))
    assert (enc.num_hidden_states, enc.hidden_size, enc.context_length) == (3, 32, 128)
    full = enc.encode(PROMPTS[:3])
    some = enc.encode(PROMPTS[:3], poolings=["last"], layers=[0, -1])
    assert list(some) == ["last"]
    np.testing.assert_allclose(some["last"], full["last"][:, [0, 2]], rtol=1e-5, atol=1e-6)
    # A single string and a single conversation are each one prompt.
    assert enc.encode("hello there")["mean"].shape == (1, 3, 32)
    assert enc.encode([{"role": "user", "content": "hello there"}])["mean"].shape == (1, 3, 32)
    with pytest.raises(EncoderError, match="layers"):
        enc.encode(PROMPTS[:1], layers=[3])
    with pytest.raises(EncoderError, match="poolings"):
        enc.encode(PROMPTS[:1], poolings=["max"])


def test_chat_message_list_equals_plain_user_prompt(tiny_encoder_dir):
    enc = load_encoder(str(tiny_encoder_dir))
    a = enc.encode(["what is the capital of france?"])
    b = enc.encode([[{"role": "user", "content": "what is the capital of france?"}]])
    np.testing.assert_array_equal(a["mean"], b["mean"])


def test_raw_template_reads_text_as_is(tiny_encoder_dir):
    raw = load_encoder(str(tiny_encoder_dir), template="raw")
    chat = load_encoder(str(tiny_encoder_dir), template="chat")
    texts = [p for p in PROMPTS if isinstance(p, str)]
    ref_mean, ref_last, _ = reference_features(tiny_encoder_dir, texts, template="raw")
    out = raw.encode(texts)
    np.testing.assert_allclose(out["mean"], ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["last"], ref_last, rtol=1e-4, atol=1e-5)
    assert (raw.count_tokens(texts) < chat.count_tokens(texts)).all()  # no template tokens around the text
    assert raw.identity() != chat.identity()
    assert raw.identity()["template"] == "raw"


def test_long_prompts_are_truncated_by_the_documented_rule(tiny_encoder_dir):
    from transformers import AutoModel

    enc = load_encoder(str(tiny_encoder_dir), max_tokens=40)
    long_prompt = "the quick brown fox jumps over the lazy dog " * 20
    prompts = ["short one", long_prompt]
    counts = enc.count_tokens(prompts)
    assert counts[1] > 40 >= counts[0]
    out = enc.encode(prompts)
    assert enc.last_truncated == 1
    assert (enc.last_token_counts == counts).all()
    # Expected: first 20 and last 20 tokens of the templated prompt, run alone.
    ids = enc.tokenize(prompts)[1]
    kept = ids[:20] + ids[-20:]
    assert truncate(ids, 40) == kept
    model = AutoModel.from_pretrained(tiny_encoder_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([kept]), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(out["last"][1], torch.stack([h[0, -1] for h in hs]).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["mean"][1], torch.stack([h[0].mean(0) for h in hs]).numpy(),
                               rtol=1e-4, atol=1e-5)
    enc.encode(prompts[:1])
    assert enc.last_truncated == 0
    # The context length caps the limit; asking for more is a configuration error naming the field.
    with pytest.raises(ConfigError, match="max_tokens"):
        load_encoder(str(tiny_encoder_dir), max_tokens=1000)


@pytest.mark.parametrize("bad, row", [("   ", 1), ([], 1), ([{"role": "user", "content": ""}], 1)])
def test_empty_prompt_is_refused_naming_the_row(tiny_encoder_dir, bad, row):
    enc = load_encoder(str(tiny_encoder_dir))
    with pytest.raises(EncoderError, match=f"row {row}"):
        enc.encode(["fine", bad, "also fine"])


def test_unknown_encoder_and_bad_spec_fields_are_named(tmp_path):
    with pytest.raises(EncoderError, match="unknown encoder"):
        load_encoder(str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match="template"):
        EncoderSpec.parse("smollm2-135m", template="jinja")
    with pytest.raises(EncoderError, match="config.json"):
        load_encoder(str(tmp_path))


def test_identity_follows_weights_not_folder(tiny_encoder_dir, tmp_path):
    from conftest import make_tiny_encoder

    same = make_tiny_encoder(tmp_path / "a" / tiny_encoder_dir.name, seed=0)
    other = make_tiny_encoder(tmp_path / "b" / tiny_encoder_dir.name, seed=1)
    base = EncoderSpec(model=str(tiny_encoder_dir)).identity()
    assert EncoderSpec(model=str(same)).identity() == base
    assert EncoderSpec(model=str(other)).identity() != base
    assert EncoderSpec(model=str(tiny_encoder_dir), max_tokens=64).identity() != base


def test_plan_batches_covers_every_row_once_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    batches = plan_batches(lengths, batch_tokens=1024, max_batch_size=16)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(500))
    for b in batches:
        assert len(b) <= 16
        assert len(b) == 1 or len(b) * lengths[b].max() <= 1024
    # Longest first, so each batch pads only up to prompts of similar length.
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)


def test_concurrent_encode_calls_keep_their_own_results_and_diagnostics(tiny_encoder_dir):
    """The gateway may call encode from several threads: each gets its own features and truncation count."""
    import threading

    enc = load_encoder(str(tiny_encoder_dir), max_tokens=40)
    long_prompt = "the quick brown fox jumps over the lazy dog " * 20
    jobs = {"short": ["short one", "A. paris B. rome"], "long": [long_prompt, "short one"]}
    expected = {name: enc.encode(prompts)["mean"] for name, prompts in jobs.items()}
    seen, start = {}, threading.Barrier(len(jobs))

    def work(name):
        start.wait()
        for _ in range(5):
            out = enc.encode(jobs[name])["mean"]
            seen.setdefault(name, []).append((out, enc.last_truncated, len(enc.last_token_counts)))

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, truncated in (("short", 0), ("long", 1)):
        for out, n_truncated, n_counts in seen[name]:
            np.testing.assert_allclose(out, expected[name], rtol=1e-4, atol=1e-5)
            assert (n_truncated, n_counts) == (truncated, 2)


@pytest.mark.parametrize("side", ["right", "left"])
def test_early_exit_runs_only_the_layers_it_needs_and_matches_a_full_pass(tmp_path, side):
    """A call that wants hidden states up to l runs decoder layers 1..l only, with the same numbers as the
    full pass; the last state (after the final norm) still runs every layer."""
    from conftest import make_tiny_encoder

    folder = make_tiny_encoder(tmp_path / "enc", layers=4)
    enc = load_encoder(str(folder), padding_side=side)
    ref_mean, ref_last, _ = reference_features(folder, PROMPTS)  # [N, 5 states, hidden]
    calls = [0] * 4
    for i, layer in enumerate(enc.model.get_decoder().layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

    out = enc.encode(PROMPTS, poolings=("mean", "last"), layers=[0, 2])
    assert calls[:2] != [0, 0] and calls[2:] == [0, 0]  # layers 3 and 4 never ran
    np.testing.assert_allclose(out["mean"], ref_mean[:, [0, 2]], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["last"], ref_last[:, [0, 2]], rtol=1e-4, atol=1e-5)

    before = list(calls)
    embeddings = enc.encode(PROMPTS, poolings=("mean",), layers=[0])
    assert calls == before  # the embeddings alone: no decoder layer ran
    np.testing.assert_allclose(embeddings["mean"], ref_mean[:, [0]], rtol=1e-4, atol=1e-5)

    full = enc.encode(PROMPTS, poolings=("mean",), layers=[1, 4])
    assert calls[3] > 0
    np.testing.assert_allclose(full["mean"], ref_mean[:, [1, 4]], rtol=1e-4, atol=1e-5)


def test_int8_quantization_is_part_of_the_identity_and_stays_close_to_float32(tiny_encoder_dir):
    fp32 = load_encoder(str(tiny_encoder_dir))
    int8 = load_encoder(str(tiny_encoder_dir), quantize="int8")
    assert "quantize" not in fp32.identity() and int8.identity()["quantize"].startswith("torch dynamic int8")
    assert {k: v for k, v in int8.identity().items() if k != "quantize"} == fp32.identity()
    kinds = {name: type(m).__module__ for name, m in int8.model.named_modules() if "proj" in name}
    # down_proj stays fp32
    assert all(("quantized" in kind) != name.endswith("down_proj") for name, kind in kinds.items())
    a = fp32.encode(PROMPTS, poolings=("mean",), layers=[1, 2])["mean"]
    b = int8.encode(PROMPTS, poolings=("mean",), layers=[1, 2])["mean"]
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cosine.min() > 0.95 and not np.array_equal(a, b)  # quantized, yet the same features in substance
    with pytest.raises(ConfigError, match="quantize"):
        load_encoder(str(tiny_encoder_dir), quantize="int4")
