"""What a trial costs: evaluation throughput, per-trial overhead, peak memory, and a grid run against the naive way.

    .venv/bin/python scripts/speed_bench.py [--model_path M] [--windows 4] [--seq_len 512] [--grid_configs 12]

Every figure is a ratio against a baseline measured in the same run, on the same machine:
1. evaluation: the plain Hugging Face loop (exp(mean(model(w, labels=w).loss)), FP32, batch 4) vs ours
   (batched windows, chunked loss, inference mode, SDPA) in FP32 and in BF16 (and FP16 on a GPU), tokens/s and
   the perplexity difference against FP32;
2. per-trial overhead: restore from the snapshot + RTN W4 g128 of every linear, against one full evaluation of
   the WikiText-2 test split (extrapolated from the measured throughput when --windows is a sample);
3. a slice of the original tool's grid (random, L2, FP16, INT8-SQ, hybrids), run our way (one load, snapshot
   restore, our evaluation) and the naive way (reload from disk per trial, plain FP32 labels loop), seconds per
   trial by method and the wall time of each.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import defaultdict

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_path", default=None, help="default: SmolLM2-135M (the embedded model)")
    ap.add_argument("--data_path", default=None)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--grid_configs", type=int, default=12, help="configurations of the original grid to time")
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()

    from compactmind import data as D
    from compactmind import models
    from compactmind import pipeline as pl
    from compactmind.calibration import Calibration
    from compactmind.errors import CompactMindError
    from compactmind.evaluate import perplexity
    from compactmind.trial import Executor

    device = models.pick_device(args.gpu, not args.gpu)
    loaded = models.load_model(args.model_path, device, torch.float32)
    model = loaded.model
    ds = D.prepare(loaded.tokenizer, D.resolve_sources(args.data_path, None), args.seq_len, 4,
                   max_eval_windows=args.windows)
    windows = ds.windows
    tokens = windows.numel()
    full_tokens = ds.info["windows_available"] * args.seq_len
    print(f"model {loaded.name} on {device}; {windows.shape[0]} windows x {args.seq_len} tokens; threads "
          f"{torch.get_num_threads()}", flush=True)

    # 1. evaluation throughput
    perplexity(model, windows[:1], 1)  # warm-up
    ref_ppl, ref_s = plain_ppl(model, windows, args.batch_size)
    rows = [("plain HF loop, FP32, labels", ref_ppl, ref_s)]
    ours = perplexity(model, windows, args.batch_size)
    rows.append(("ours, FP32", ours.perplexity, ours.seconds))
    for dtype in ([torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.bfloat16]):
        model.to(dtype)
        r = perplexity(model, windows, args.batch_size)
        rows.append((f"ours, {str(dtype)[6:]}", r.perplexity, r.seconds))
        model.to(torch.float32)
    print("\n1. evaluation")
    print(f"{'':32}{'tokens/s':>10}{'x plain':>9}{'perplexity':>12}{'vs FP32':>10}")
    for label, ppl, seconds in rows:
        print(f"{label:32}{tokens / seconds:10.0f}{ref_s / seconds:9.2f}{ppl:12.4f}"
              f"{100 * (ppl / ours.perplexity - 1):9.3f}%")
    best_rate = max(tokens / s for _, _, s in rows[1:])

    # 2. per-trial overhead
    snap = models.Snapshot(model)
    restores, rtns = [], []
    for _ in range(3):
        pl.apply_(model, pl.parse("rtn(bits=4, group_size=128)"), None, 0)
        t = time.perf_counter()
        snap.restore()
        restores.append(time.perf_counter() - t)
        t = time.perf_counter()
        pl.apply_(model, pl.parse("rtn(bits=4, group_size=128)"), None, 0)
        rtns.append(time.perf_counter() - t)
        snap.restore()
    full_eval = full_tokens / best_rate
    overhead = statistics.median(restores) + statistics.median(rtns)
    print("\n2. per-trial overhead")
    print(f"restore {statistics.median(restores):.3f} s + RTN W4 g128 {statistics.median(rtns):.3f} s = "
          f"{overhead:.3f} s; a full evaluation ({full_tokens} tokens at {best_rate:.0f} tokens/s) "
          f"{full_eval:.0f} s -> overhead {100 * overhead / full_eval:.2f}% (goal <= 3%)")
    print(f"snapshot: {snap.nbytes / 2**20:.0f} MiB on {snap._store_device}")

    # 3. a slice of the original grid, our way vs the naive way
    grids = {"random_pruning": {"sparsity": [0.1, 0.2, 0.3, 0.4, 0.5]},
             "l2_pruning": {"sparsity": [0.1, 0.2, 0.3], "scope": ["mlp", "heads", "both"]},
             "int8_sq": {"alpha": [0.5, 0.65, 0.8]}}
    grid = pl.candidates(["random_pruning", "l2_pruning", "fp16", "int8_sq"], True, grids)
    valid = []
    for c in grid:  # configurations this model can take (the study records the others as invalid at no cost)
        try:
            pl.check(model, c)
            valid.append(c)
        except CompactMindError:
            pass
    step = max(1, len(valid) // args.grid_configs)
    chosen = valid[::step][:args.grid_configs]
    per = {"ours": defaultdict(list), "naive": defaultdict(list)}
    walls = {}
    del snap
    start = time.perf_counter()
    executor = Executor(loaded, ds)  # what a study's trials run through: snapshot restore, our evaluation
    for c in chosen:
        t = time.perf_counter()
        executor.compress(c)
        executor.evaluate(args.batch_size)
        per["ours"][c.steps[0].method + ("+" if c.is_hybrid else "")].append(time.perf_counter() - t)
    walls["ours"] = time.perf_counter() - start
    del executor, model, loaded
    start = time.perf_counter()
    for c in chosen:
        t = time.perf_counter()
        fresh = models.load_model(args.model_path, device, torch.float32)
        pl.apply_(fresh.model, c, Calibration(ds.calib), 0)
        plain_ppl(fresh.model, windows, args.batch_size)
        per["naive"][c.steps[0].method + ("+" if c.is_hybrid else "")].append(time.perf_counter() - t)
        del fresh
    walls["naive"] = time.perf_counter() - start
    print(f"\n3. {len(chosen)} of the original grid's {len(grid)} configurations ({len(valid)} valid on this model; "
          "'+': hybrids starting with it)")
    print(f"{'first step':20}{'trials':>7}{'ours s/trial':>14}{'naive s/trial':>15}{'speed-up':>10}")
    for key in per["ours"]:
        o, n = statistics.mean(per["ours"][key]), statistics.mean(per["naive"][key])
        print(f"{key:20}{len(per['ours'][key]):7d}{o:14.2f}{n:15.2f}{n / o:10.2f}")
    print(f"wall: ours {walls['ours']:.1f} s, naive {walls['naive']:.1f} s -> {walls['naive'] / walls['ours']:.2f}x; "
          f"valid grid extrapolated: ours {walls['ours'] / len(chosen) * len(valid) / 60:.1f} min, naive "
          f"{walls['naive'] / len(chosen) * len(valid) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
