"""Quality table: the published orderings of pruning and quantization methods, reproduced on our model.

Evaluates, on the same WikiText-2 raw test windows for every row, with calibration windows drawn from the
WikiText-2 validation split: dense; magnitude, Wanda and SparseGPT at 50% and 2:4; RTN and GPTQ at W4 and W3;
AWQ W4 and W3; RTN W4 symmetric; SmoothQuant W8A8 and naive W8A8. Prints perplexity, compression ratio and
compression seconds per row, then checks the orderings the papers report.

    .venv/bin/python scripts/quality.py [--model_path DIR] [--seq_len 512] [--windows 16] [--samples 16]
        [--rows RTN,GPTQ]
"""

from __future__ import annotations

import argparse
import sys

import torch

from compactmind import data as D
from compactmind import models
from compactmind import pipeline as pl
from compactmind.executor import Executor



def rows(group: int) -> list[tuple[str, str]]:
    g = f"group_size={group}"
    return [
        ("dense", "dense"),
        ("magnitude 50%", "magnitude(sparsity=0.5)"),
        ("wanda 50%", "wanda(sparsity=0.5)"),
        ("sparsegpt 50%", "sparsegpt(sparsity=0.5)"),
        ("magnitude 2:4", "magnitude_nm(pattern=2:4)"),
        ("wanda 2:4", "wanda_nm(pattern=2:4)"),
        ("sparsegpt 2:4", "sparsegpt_nm(pattern=2:4)"),
        (f"RTN W4 g{group}", f"rtn(bits=4, {g})"),
        (f"RTN W4 g{group} sym", f"rtn(bits=4, {g}, symmetric=True)"),
        (f"GPTQ W4 g{group}", f"gptq(bits=4, {g})"),
        (f"RTN W3 g{group}", f"rtn(bits=3, {g})"),
        (f"GPTQ W3 g{group}", f"gptq(bits=3, {g})"),
        (f"AWQ W4 g{group}", f"awq(bits=4, {g})"),
        (f"AWQ W3 g{group}", f"awq(bits=3, {g})"),
        ("SmoothQuant W8A8", "int8_sq(alpha=0.5)"),
        ("naive W8A8", "int8_sq(alpha=0.5, smooth=False)"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model_path", help="model folder or .gguf (default: SmolLM2-135M)")
    ap.add_argument("--test", default=str(D.WIKITEXT_TEST), help="default: the shipped WikiText-2 raw test variant")
    ap.add_argument("--calib", default=str(D.WIKITEXT_VALID), help="default: the shipped WikiText-2 validation split")
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--group_size", type=int, default=64, help="a group size that divides the model's widths")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--rows", default=None, help="only the rows whose label contains one of these comma-separated "
                    "words (e.g. RTN,GPTQ); the orderings whose rows all ran are checked")
    args = ap.parse_args()
    wanted = [w.strip().lower() for w in args.rows.split(",")] if args.rows else None

    device = models.pick_device(gpu=args.gpu)
    loaded = models.load_model(args.model_path, device, torch.float32 if device.type == "cpu" else torch.float16)
    data = D.prepare(loaded.tokenizer, D.resolve_sources(args.test, args.calib), args.seq_len,
                     args.samples, args.windows, seed=0)
    executor = Executor(loaded, data)
    print(f"model {loaded.name}, {data.info['windows']} windows x {args.seq_len} tokens of {args.test}, "
          f"{args.samples} calibration samples from {args.calib}, {str(loaded.dtype)[6:]} on {device}")
    if loaded.source_info:
        info = loaded.source_info
        print(f"note: the 'dense' model is dequantized from a {info['format']} file, {info['bits_per_weight']:.2f} "
              f"bits/weight as stored (ratio {1 - info['bytes'] / (4 * info['weights']):.4f} against FP32): every "
              "ratio below is against FP32 weights, and a W4 model is not smaller than the file it came from")
    print(f"{'row':<20} {'perplexity':>10} {'ratio':>7} {'bits/w':>7} {'compress s':>10}  pipeline")
    results = {}
    for label, text in rows(args.group_size):
        if wanted and label != "dense" and not any(w in label.lower() for w in wanted):
            continue
        spec = pl.parse(text)
        compressed = executor.compress(spec)
        seconds, fp = compressed.seconds, compressed.footprint
        ppl = executor.evaluate(batch_size=4).perplexity
        results[label] = ppl
        print(f"{label:<20} {ppl:>10.3f} {fp.compression_ratio:>7.4f} {fp.bits_per_weight:>7.2f} {seconds:>10.1f}  "
              f"{spec}", flush=True)

    g = args.group_size
    below = [  # (name, row a, factor, row b): a < factor x b, checked where both rows ran
        ("wanda 50% well below magnitude 50%", "wanda 50%", 0.8, "magnitude 50%"),
        ("sparsegpt 50% well below magnitude 50%", "sparsegpt 50%", 0.8, "magnitude 50%"),
        ("magnitude 2:4 worse than 50%", "magnitude 50%", 1.0, "magnitude 2:4"),
        ("wanda 2:4 worse than 50%", "wanda 50%", 1.0, "wanda 2:4"),
        ("sparsegpt 2:4 worse than 50%", "sparsegpt 50%", 1.0, "sparsegpt 2:4"),
        ("GPTQ W4 below RTN W4", f"GPTQ W4 g{g}", 1.0, f"RTN W4 g{g}"),
        ("GPTQ W3 clearly below RTN W3", f"GPTQ W3 g{g}", 0.9, f"RTN W3 g{g}"),
        ("AWQ W4 clearly below RTN W4 (by 2% or more)", f"AWQ W4 g{g}", 0.98, f"RTN W4 g{g}"),
        ("AWQ W3 at least as good as GPTQ W3", f"AWQ W3 g{g}", 1.0 + 1e-12, f"GPTQ W3 g{g}"),
        ("SmoothQuant W8A8 within 3% of dense", "SmoothQuant W8A8", 1.03, "dense"),
    ]
    checks = [(name, results[a] < factor * results[b]) for name, a, factor, b in below
              if a in results and b in results]
    print()
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
