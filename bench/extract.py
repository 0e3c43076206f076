"""Feature extraction throughput: our engine against a naive loop, measured in the same run.

naive  = what common router toolkits do: batches of 4 prompts in dataset order, padded to the longest, one
         forward with every hidden state, masked-mean and last-token pooling.
engine = prefill_router's Encoder: prompts sorted by length, batches filled to a token budget, same pooling.
Both run the same model object on the same token ids, so the difference is the batching alone.

CPU mode (default): the real default encoder (SmolLM2-135M-Instruct) over the first N MMLU-Pro prompts.
    .venv/bin/python bench/extract.py --device cpu --n 256 [--data-root /work/shared/data]
GPU mode: random-weight models built from the real configs in bench/configs/ (no download), over prompts
with MMLU-Pro's token-length distribution (bench/configs/mmlu_pro_lengths.json), in bfloat16. Also reports
achieved TFLOP/s (2 x non-embedding parameters x real tokens / s) as a share of a bf16 matmul peak measured
in the same run.
    python bench/extract.py --device cuda --n 2048 [--models smollm2-135m,qwen2.5-1.5b,llama-3-8b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from prefill_router.features.encoder import Encoder, EncoderSpec, load_encoder  # noqa: E402  (after sys.path)

CONFIGS = HERE / "configs"
GPU_MODELS = ("smollm2-135m", "qwen2.5-1.5b", "llama-3-8b")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_extract(model, token_ids: list[list[int]], device: torch.device, pad_id: int, batch_size: int = 4):
    """Batches of `batch_size` in dataset order, right-padded to the longest; all hidden states pooled."""
    means, lasts, padded = [], [], 0
    with torch.inference_mode():
        for start in range(0, len(token_ids), batch_size):
            batch = token_ids[start:start + batch_size]
            longest = max(len(x) for x in batch)
            padded += longest * len(batch)
            ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for i, row in enumerate(batch):
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
            states = torch.stack(hidden, 1).float()  # [b, L, T, H]
            m = mask[:, None, :, None].float()
            means.append(((states * m).sum(2) / m.sum(2)).cpu().numpy())
            lengths = mask.sum(1) - 1
            lasts.append(states[torch.arange(len(batch), device=device), :, lengths].cpu().numpy())
    return {"mean": np.concatenate(means), "last": np.concatenate(lasts)}, padded


def engine_extract(encoder: Encoder, token_ids: list[list[int]], batch_tokens: int | None):
    from prefill_router.features.encoder import DEFAULT_BATCH_TOKENS, plan_batches

    out = {p: np.empty((len(token_ids), encoder.num_hidden_states, encoder.hidden_size), np.float32)
           for p in ("mean", "last")}
    for rows, pooled in encoder.iter_batches([None] * len(token_ids), token_ids=token_ids, batch_tokens=batch_tokens):
        for p, array in out.items():
            array[rows] = pooled[p]
    budget = batch_tokens or DEFAULT_BATCH_TOKENS.get(encoder.device.type, 4096)
    lengths = [len(x) for x in token_ids]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan_batches(lengths, budget))
    return out, padded


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def matmul_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def non_embedding_params(model) -> int:
    embedding = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding


def mmlu_pro_lengths(n: int, seed: int) -> list[int]:
    """n prompt lengths drawn from MMLU-Pro's templated-prompt length distribution (stored quantiles)."""
    table = json.loads((CONFIGS / "mmlu_pro_lengths.json").read_text())
    quantiles = np.asarray(table["quantiles"], dtype=float)
    u = np.random.default_rng(seed).uniform(0, 1, size=n)
    return np.round(np.interp(u, np.linspace(0, 1, len(quantiles)), quantiles)).astype(int).tolist()


def run_pair(label, model, encoder, token_ids, device, pad_id, batch_tokens, repeats, flops_per_token=None,
             peak=None):
    """Time naive and engine alternately `repeats` times; return table rows (median time)."""
    times = {"naive (batch 4, dataset order)": [], "engine (sorted, token budget)": []}
    outputs, padded = {}, {}
    for r in range(repeats):
        order = list(times) if r % 2 == 0 else list(reversed(times))
        for name in order:
            if name.startswith("naive"):
                (out, pad), dt = timed(lambda: naive_extract(model, token_ids, device, pad_id), device)
            else:
                (out, pad), dt = timed(lambda: engine_extract(encoder, token_ids, batch_tokens), device)
            times[name].append(dt)
            outputs[name], padded[name] = out, pad
    a, b = (outputs[k] for k in times)
    diff = max(float(np.abs(a[p] - b[p]).max() / (np.abs(a[p]).max() + 1e-9)) for p in ("mean", "last"))
    tokens = sum(len(x) for x in token_ids)
    base = statistics.median(times["naive (batch 4, dataset order)"])
    rows = []
    for name, ts in times.items():
        t = statistics.median(ts)
        row = {"model": label, "method": name, "prompts": len(token_ids), "tokens": tokens,
               "padding %": 100.0 * (padded[name] / tokens - 1), "seconds": t, "prompts/s": len(token_ids) / t,
               "tokens/s": tokens / t, "speedup": base / t}
        if flops_per_token is not None:
            tflops = flops_per_token * tokens / t / 1e12
            row["TFLOP/s"] = tflops
            row["% of bf16 peak"] = 100.0 * tflops / peak
        rows.append(row)
    return rows, diff


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")


def cpu_mode(args) -> None:
    from prefill_router.data import load_mmlu_pro

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_mmlu_pro(args.data_root, limit=args.n)
    encoder = load_encoder(EncoderSpec(device="cpu"))
    token_ids = encoder.tokenize(ds.prompts)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average before run {os.getloadavg()[0]:.1f}", file=sys.stderr)
    # Warm-up on a few prompts so neither method pays first-call costs.
    naive_extract(encoder.model, token_ids[:4], encoder.device, encoder._pad_id)
    engine_extract(encoder, token_ids[:4], args.batch_tokens)
    rows, diff = run_pair("SmolLM2-135M (GGUF->fp32)", encoder.model, encoder, token_ids, encoder.device,
                          encoder._pad_id, args.batch_tokens, args.repeats)
    print(f"max relative difference between the two methods' features: {diff:.2e}", file=sys.stderr)
    print(f"load average after run {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print_table(rows)


def gpu_mode(args) -> None:
    from transformers import AutoConfig, AutoModel

    device = torch.device(args.device)
    peak = matmul_peak_tflops(device)
    print(f"device: {torch.cuda.get_device_name(device)}, measured bf16 matmul peak {peak:.0f} TFLOP/s",
          file=sys.stderr)
    lengths = mmlu_pro_lengths(args.n, args.seed)
    rng = np.random.default_rng(args.seed)
    all_rows = []
    for name in args.models.split(","):
        config = AutoConfig.for_model(**json.loads((CONFIGS / f"{name}.json").read_text()))
        with torch.device(device):
            model = AutoModel.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        token_ids = [rng.integers(3, config.vocab_size, size=n).tolist() for n in lengths]
        encoder = Encoder.from_model(model, spec=EncoderSpec(model=name, device=args.device))
        flops_per_token = 2 * non_embedding_params(model)
        naive_extract(model, token_ids[:8], device, 0)
        engine_extract(encoder, token_ids[:64], args.batch_tokens)
        rows, diff = run_pair(name, model, encoder, token_ids, device, 0, args.batch_tokens, args.repeats,
                              flops_per_token, peak)
        print(f"{name}: max relative difference between methods {diff:.2e} (bf16)", file=sys.stderr)
        all_rows += rows
        del model, encoder
        torch.cuda.empty_cache()
    print_table(all_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (real SmolLM2) or cuda (random-weight real configs)")
    parser.add_argument("--n", type=int, help="prompts (default 256 on CPU, 2048 on GPU)")
    parser.add_argument("--data-root",
                        default=os.environ.get("PREFILL_ROUTER_DATA", str(HERE.parents[1] / "shared" / "data")),
                        help="shared data folder (CPU mode)")
    parser.add_argument("--models", default=",".join(GPU_MODELS), help="GPU mode: configs from bench/configs/")
    parser.add_argument("--batch-tokens", type=int, help="engine token budget (default: the engine's)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method, alternating (median)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.device == "cpu":
        args.n = args.n or 256
        cpu_mode(args)
    else:
        args.n = args.n or 2048
        gpu_mode(args)


if __name__ == "__main__":
    main()
