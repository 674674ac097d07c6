"""What a trial costs: evaluation throughput, per-trial overhead, a grid run against the naive way, the calibrated
methods against a dense forward pass, and one block of Llama-2-7B's shape.

    .venv/bin/python scripts/speed_bench.py [--model_path M] [--windows 4] [--seq_len 512] [--grid_configs 12]
        [--sections 1,2,3,4,5] [--gpu]

Every figure is a ratio against a baseline measured in the same run, on the same machine:
1. evaluation: the plain Hugging Face loop (exp(mean(model(w, labels=w).loss)), FP32, batch 4) vs ours
   (batched windows, chunked loss, inference mode, SDPA) in FP32 and in BF16 (and FP16 on a GPU), tokens/s and
   the perplexity difference against FP32;
2. per-trial overhead: restore from the snapshot + RTN W4 g128 of every linear, against one full evaluation of
   the WikiText-2 test split (extrapolated from the measured throughput when --windows is a sample);
3. a slice of the original tool's grid (random, L2, FP16, INT8-SQ, hybrids), run our way (one load, snapshot
   restore, our evaluation) and the naive way (reload from disk per trial, plain FP32 labels loop);
4. GPTQ W4 g64 and SparseGPT 50% with --calib_samples samples of --seq_len tokens, against one dense forward pass
   over the same calibration tokens, split into the two block passes of the calibration loop, the statistics
   (Hessians) and the solve;
5. one decoder block of Llama-2-7B's shape (hidden 4096, MLP 11008, 32 heads, random weights, BF16; FP32
   statistics): seconds and peak memory of the Hessians and of GPTQ W4 g128 / SparseGPT 50% on its 7 linears,
   and the extrapolation to 32 blocks.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch


def plain_ppl(model, windows: torch.Tensor, batch: int) -> tuple[float, float]:
    """The reference protocol as users write it: labels=input_ids, mean of the batch losses."""
    start = time.perf_counter()
    losses = []
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            w = windows[i:i + batch].to(next(model.parameters()).device)
            losses.append(model(input_ids=w, labels=w).loss.float().item())
    return math.exp(statistics.mean(losses)), time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def evaluation(model, windows, batch: int, device) -> float:
    """1. Returns the best tokens/s of ours."""
    from compactmind.evaluate import perplexity

    tokens = windows.numel()
    perplexity(model, windows[:1], 1)  # warm-up
    ref_ppl, ref_s = plain_ppl(model, windows, batch)
    rows = [("plain HF loop, FP32, labels", ref_ppl, ref_s)]
    ours = perplexity(model, windows, batch)
    rows.append(("ours, FP32", ours.perplexity, ours.seconds))
    for dtype in ([torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.bfloat16]):
        model.to(dtype)
        r = perplexity(model, windows, batch)
        rows.append((f"ours, {str(dtype)[6:]}", r.perplexity, r.seconds))
        model.to(torch.float32)
    print("\n1. evaluation")
    print(f"{'':32}{'tokens/s':>10}{'x plain':>9}{'perplexity':>12}{'vs FP32':>10}")
    for label, ppl, seconds in rows:
        print(f"{label:32}{tokens / seconds:10.0f}{ref_s / seconds:9.2f}{ppl:12.4f}"
              f"{100 * (ppl / ours.perplexity - 1):9.3f}%")
    return max(tokens / s for _, _, s in rows[1:])


def overhead(model, best_rate: float, full_tokens: int) -> None:
    """2. Restore + RTN against one full evaluation."""
    from compactmind import models
    from compactmind import pipeline as pl

    snap = models.Snapshot(model)
    restores, rtns = [], []
    for _ in range(3):
        pl.apply_(model, pl.parse("rtn(bits=4, group_size=128)"), None, 0)
        restores.append(timed(snap.restore))
        rtns.append(timed(lambda: pl.apply_(model, pl.parse("rtn(bits=4, group_size=128)"), None, 0)))
        snap.restore()
    full_eval = full_tokens / best_rate
    cost = statistics.median(restores) + statistics.median(rtns)
    print("\n2. per-trial overhead")
    print(f"restore {statistics.median(restores):.3f} s + RTN W4 g128 {statistics.median(rtns):.3f} s = {cost:.3f} s; "
          f"a full evaluation ({full_tokens} tokens at {best_rate:.0f} tokens/s) {full_eval:.0f} s -> overhead "
          f"{100 * cost / full_eval:.2f}% (goal <= 3%); snapshot {sum(c.numel() * c.element_size() for _, c in snap._tensors) / 2**20:.0f} MiB on {snap._store_device}")


def grid_slice(loaded, ds, args, device) -> None:
    """3. A slice of the original grid, our way vs the naive way."""
    from compactmind import models
    from compactmind import pipeline as pl
    from compactmind.calibration import Calibration
    from compactmind.errors import CompactMindError
    from compactmind.executor import Executor

    grids = {"random_pruning": {"sparsity": [0.1, 0.2, 0.3, 0.4, 0.5]},
             "l2_pruning": {"sparsity": [0.1, 0.2, 0.3], "scope": ["mlp", "heads", "both"]},
             "int8_sq": {"alpha": [0.5, 0.65, 0.8]}}
    grid = pl.candidates(["random_pruning", "l2_pruning", "fp16", "int8_sq"], True, grids)
    valid = []
    for c in grid:  # configurations this model can take (the study records the others as invalid at no cost)
        try:
            pl.check(loaded.model, c)
            valid.append(c)
        except CompactMindError:
            pass
    chosen = valid[::max(1, len(valid) // args.grid_configs)][:args.grid_configs]
    per, walls = {"ours": defaultdict(list), "naive": defaultdict(list)}, {}
    start = time.perf_counter()
    executor = Executor(loaded, ds)  # what a study's trials run through: snapshot restore, our evaluation
    for c in chosen:
        per["ours"][c.steps[0].method + ("+" if c.is_hybrid else "")].append(
            timed(lambda: (executor.compress(c), executor.evaluate(args.batch_size))))
    walls["ours"] = time.perf_counter() - start
    start = time.perf_counter()
    for c in chosen:
        def naive():
            fresh = models.load_model(args.model_path, device, torch.float32)
            pl.apply_(fresh.model, c, Calibration(ds.calib), 0)
            plain_ppl(fresh.model, ds.windows, args.batch_size)
        per["naive"][c.steps[0].method + ("+" if c.is_hybrid else "")].append(timed(naive))
    walls["naive"] = time.perf_counter() - start
    print(f"\n3. {len(chosen)} of the original grid's {len(grid)} configurations ({len(valid)} valid on this model; "
          "'+': hybrids starting with it)")
    print(f"{'first step':20}{'trials':>7}{'ours s/trial':>14}{'naive s/trial':>15}{'speed-up':>10}")
    for key in per["ours"]:
        o, n = statistics.mean(per["ours"][key]), statistics.mean(per["naive"][key])
        print(f"{key:20}{len(per['ours'][key]):7d}{o:14.2f}{n:15.2f}{n / o:10.2f}")
    print(f"wall: ours {walls['ours']:.1f} s, naive {walls['naive']:.1f} s -> {walls['naive'] / walls['ours']:.2f}x")


def calibrated(loaded, calib_ids: torch.Tensor) -> None:
    """4. GPTQ and SparseGPT against one dense forward pass over the same calibration tokens."""
    from compactmind import models
    from compactmind import pipeline as pl
    from compactmind.calibration import Calibration, Hessian, run_body, sequential_

    model = loaded.model
    snap = models.Snapshot(model)
    forward = timed(lambda: run_body(model, calib_ids))
    passes = timed(lambda: sequential_(model, Calibration(calib_ids), lambda n, lin: None, lambda *a: None))
    stats = timed(lambda: sequential_(model, Calibration(calib_ids), lambda n, lin: Hessian(lin), lambda *a: None))
    print(f"\n4. calibrated methods, {calib_ids.shape[0]} samples x {calib_ids.shape[1]} tokens: one dense forward "
          f"pass {forward:.1f} s; the loop's two block passes {passes:.1f} s; + Hessians {stats - passes:.1f} s")
    for text in ("gptq(bits=4, group_size=64)", "sparsegpt(sparsity=0.5)"):
        snap.restore()
        total = timed(lambda: pl.apply_(model, pl.parse(text), Calibration(calib_ids), 0))
        print(f"{text:32}{total:8.1f} s = {total / forward:5.2f}x the dense forward (goal <= 3x): passes {passes:.1f} s, "
              f"statistics {stats - passes:.1f} s, solve {total - stats:.1f} s")
    snap.restore()


def llama7b_block(samples: int, seq_len: int, device) -> None:
    """5. The methods' math on one block of Llama-2-7B's shape."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from compactmind.calibration import Hessian
    from compactmind.methods._quant import gptq
    from compactmind.methods._sparse import sparsegpt_

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"  # a standalone block: no model to pick it
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(device=device, dtype=torch.bfloat16).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    x = torch.randn(samples, seq_len, 4096, device=device, dtype=torch.bfloat16)
    positions = torch.arange(seq_len, device=device)[None]
    cos_sin = tuple(t.to(torch.bfloat16) for t in rotary(x, positions))
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    peak_rss_reset()
    start = time.perf_counter()
    hessians = {n: Hessian(m) for n, m in linears.items()}
    hooks = [m.register_forward_hook(lambda mod, a, o, acc=hessians[n]: acc.add_batch(a[0], o))
             for n, m in linears.items()]
    with torch.inference_mode():
        for row in x:
            layer(row[None], position_embeddings=cos_sin, attention_mask=None)
    for h in hooks:
        h.remove()
    stats_s, stats_peak = time.perf_counter() - start, peak_rss()
    print(f"\n5. one Llama-2-7B-shaped block (BF16 weights, {samples} x {seq_len} tokens) on {device}: Hessians of its "
          f"7 linears {stats_s:.1f} s, peak host memory {stats_peak / 2**30:.2f} GiB")
    for label, solve in (("GPTQ W4 g128", lambda w, h: gptq(w, h, 4, 128, False, True)),
                         ("SparseGPT 50%", lambda w, h: sparsegpt_(w, h, 0.5))):
        peak_rss_reset()
        seconds = timed(lambda: [solve(m.weight, hessians[n].H) for n, m in linears.items()])
        print(f"{label:16} solve {seconds:7.1f} s per block, peak host memory {peak_rss() / 2**30:.2f} GiB; 32 blocks: "
              f"{32 * (seconds + stats_s) / 60:.1f} min with the statistics (not counting the block passes)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_path", default=None, help="default: SmolLM2-135M (the embedded model)")
    ap.add_argument("--data_path", default=None)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--grid_configs", type=int, default=12, help="configurations of the original grid to time")
    ap.add_argument("--calib_samples", type=int, default=32)
    ap.add_argument("--block_samples", type=int, default=8, help="section 5: samples of --seq_len tokens")
    ap.add_argument("--sections", default="1,2,3,4,5")
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    sections = {int(s) for s in args.sections.split(",")}

    from compactmind import data as D
    from compactmind import models

    device = models.pick_device(args.gpu, not args.gpu)
    loaded = models.load_model(args.model_path, device, torch.float32)
    ds = D.prepare(loaded.tokenizer, D.resolve_sources(args.data_path, None), args.seq_len, args.calib_samples,
                   max_eval_windows=args.windows)
    print(f"model {loaded.name} on {device}; {ds.windows.shape[0]} windows x {args.seq_len} tokens; threads "
          f"{torch.get_num_threads()}", flush=True)
    best_rate = evaluation(loaded.model, ds.windows, args.batch_size, device) if sections & {1, 2} else None
    if 2 in sections:
        overhead(loaded.model, best_rate, ds.info["windows_available"] * args.seq_len)
    if 3 in sections:
        grid_slice(loaded, ds, args, device)
    if 4 in sections:
        calibrated(loaded, ds.calib)
    if 5 in sections:
        llama7b_block(args.block_samples, args.seq_len, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
