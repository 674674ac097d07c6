"""Quality table: the published orderings of pruning and quantization methods, reproduced on our model, with the
spread over calibration draws, and a guard that no method got worse unseen.

Protocol (printed with the table): the first --windows windows of --seq_len tokens of the shipped WikiText-2 raw
test variant, FP32; --samples calibration samples of --seq_len tokens drawn (under each seed) from the first
three quarters of the shipped WikiText-2 validation split. Every row is measured once per seed (--seeds 0,1,2);
rows whose method uses no calibration data are measured once. Prints, per row: the mean perplexity, the spread
(max - min over the seeds), the ratio, bits per weight and compression seconds; then the published orderings.

    .venv/bin/python scripts/quality.py [--rows GPTQ,AWQ] [--seeds 0,1,2]     # measure
    .venv/bin/python scripts/quality.py --check [--rows GPTQ]                   # measure and compare
    .venv/bin/python scripts/quality.py --write                                 # measure, then commit the table

--check compares each measured row with scripts/quality_expected.json (measured under the same protocol, which
it records) and exits 1 when a row's mean is worse than its expected mean by more than its expected spread
(at least 0.5%): a method that got worse beyond what a calibration draw explains. Run the rows a change
touches before you land it whenever a method, the calibration loop, the data preparation or rounding changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from compactmind import data as D
from compactmind import models
from compactmind import pipeline as pl
from compactmind.executor import Executor
from compactmind.registry import get_method

EXPECTED = Path(__file__).with_name("quality_expected.json")
MIN_SPREAD = 0.005  # relative: what FP32 evaluation noise and ties can move a seed-free row by


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
        (f"GPTQ W4 g{group} sym", f"gptq(bits=4, {g}, symmetric=True)"),
        (f"RTN W3 g{group}", f"rtn(bits=3, {g})"),
        (f"GPTQ W3 g{group}", f"gptq(bits=3, {g})"),
        (f"AWQ W4 g{group}", f"awq(bits=4, {g})"),
        (f"AWQ W3 g{group}", f"awq(bits=3, {g})"),
        ("SmoothQuant W8A8", "int8_sq(alpha=0.5)"),
        ("naive W8A8", "int8_sq(alpha=0.5, smooth=False)"),
        ("FP8 W8A8", "fp8"),
        ("FP8 W8A8, GPTQ onto its grid", "fp8(solver=gptq)"),
        ("GGUF Q4_K (imatrix)", "gguf(type=Q4_K, solver=imatrix)"),
        ("GGUF Q4_K (gptq)", "gguf(type=Q4_K, solver=gptq)"),
    ]


ORDERINGS = [  # (name, row a, factor, row b): a < factor x b, checked where both rows ran
    ("wanda 50% well below magnitude 50%", "wanda 50%", 0.8, "magnitude 50%"),
    ("sparsegpt 50% well below magnitude 50%", "sparsegpt 50%", 0.8, "magnitude 50%"),
    ("magnitude 2:4 worse than 50%", "magnitude 50%", 1.0, "magnitude 2:4"),
    ("wanda 2:4 worse than 50%", "wanda 50%", 1.0, "wanda 2:4"),
    ("sparsegpt 2:4 worse than 50%", "sparsegpt 50%", 1.0, "sparsegpt 2:4"),
    ("GPTQ W4 below RTN W4", "GPTQ W4 g{g}", 1.0, "RTN W4 g{g}"),
    ("GPTQ W3 clearly below RTN W3", "GPTQ W3 g{g}", 0.9, "RTN W3 g{g}"),
    ("AWQ W4 clearly below RTN W4 (by 2% or more)", "AWQ W4 g{g}", 0.98, "RTN W4 g{g}"),
    ("AWQ W3 at least as good as GPTQ W3", "AWQ W3 g{g}", 1.0 + 1e-12, "GPTQ W3 g{g}"),
    ("SmoothQuant W8A8 within 3% of dense", "SmoothQuant W8A8", 1.03, "dense"),
    # FP8's exponent keeps outlier activations that INT8's uniform grid clips (Kuzmin et al., "FP8 Quantization: The
    # Power of the Exponent", NeurIPS 2022); "within 1% of dense" is a goal (the README says where it stands), not one
    ("FP8 W8A8 no worse than naive INT8 W8A8", "FP8 W8A8", 1.0 + 1e-12, "naive W8A8"),
    ("FP8 by GPTQ below FP8 by rounding", "FP8 W8A8, GPTQ onto its grid", 1.0, "FP8 W8A8"),
]


def calibrated(text: str) -> bool:
    return any(get_method(s.method).calibrates(s.params) for s in pl.parse(text).steps)


def measure(args, table: list[tuple[str, str]]) -> tuple[dict, dict]:
    device = models.pick_device(gpu=args.gpu)
    loaded = models.load_model(args.model_path, device, torch.float32 if device.type == "cpu" else torch.float16)
    seeds = [int(s) for s in args.seeds.split(",")]
    draws = {seed: D.prepare(loaded.tokenizer, D.resolve_sources(args.test, args.calib), args.seq_len, args.samples,
                             args.windows, seed=seed) for seed in seeds}
    executor = Executor(loaded, draws[seeds[0]], seeds[0])  # one snapshot of the pristine model for every draw
    protocol = {"model": loaded.name, "test": Path(args.test).name, "windows": args.windows, "seq_len": args.seq_len,
                "calibration": Path(args.calib).name, "samples": args.samples, "dtype": str(loaded.dtype)[6:],
                "seeds": seeds}
    print(f"model {loaded.name}, {args.windows} windows x {args.seq_len} tokens of {args.test}, {args.samples} "
          f"calibration samples from {args.calib} (seeds {args.seeds}), {protocol['dtype']} on {device}")
    if loaded.source_info:
        info = loaded.source_info
        print(f"note: the 'dense' model is dequantized from a {info['format']} file, {info['bits_per_weight']:.2f} "
              f"bits/weight as stored (ratio {1 - info['bytes'] / (4 * info['weights']):.4f} against FP32): every "
              "ratio below is against FP32 weights, and a W4 model is not smaller than the file it came from")
    print(f"{'row':<22} {'perplexity':>10} {'spread':>8} {'ratio':>7} {'bits/w':>7} {'compress s':>10}  pipeline")
    results = {}
    for label, text in table:
        spec = pl.parse(text)
        figures = []
        for seed in (seeds if calibrated(text) else seeds[:1]):
            executor.use(draws[seed], seed)
            compressed = executor.compress(spec)
            figures.append((executor.evaluate(batch_size=4).perplexity, compressed))
        ppls = [p for p, _ in figures]
        fp, seconds = figures[0][1].footprint, sum(c.seconds for _, c in figures) / len(figures)
        results[label] = {"pipeline": str(spec), "perplexity": sum(ppls) / len(ppls), "spread": max(ppls) - min(ppls),
                          "per_seed": ppls, "ratio": fp.compression_ratio, "bits_per_weight": fp.bits_per_weight,
                          "compress_seconds": seconds}
        r = results[label]
        print(f"{label:<22} {r['perplexity']:>10.3f} {r['spread']:>8.3f} {r['ratio']:>7.4f} "
              f"{r['bits_per_weight']:>7.2f} {seconds:>10.1f}  {spec}  (seeds: {', '.join(f'{p:.3f}' for p in ppls)})",
              flush=True)
    return results, protocol


def orderings(results: dict, group: int) -> bool:
    print()
    ok_all = True
    for name, a, factor, b in ORDERINGS:
        a, b = a.format(g=group), b.format(g=group)
        if a in results and b in results:
            ok = results[a]["perplexity"] < factor * results[b]["perplexity"]
            ok_all &= ok
            print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return ok_all


def check(results: dict, protocol: dict) -> bool:
    """Each row against the committed table: worse by more than its spread (at least MIN_SPREAD) fails."""
    expected = json.loads(EXPECTED.read_text())
    if expected["protocol"] != protocol:
        print(f"FAIL  the committed table was measured under another protocol: {expected['protocol']}")
        return False
    ok_all = True
    print(f"\nagainst {EXPECTED.name}:")
    for label, r in results.items():
        want = expected["rows"].get(label)
        if want is None:
            print(f"NEW   {label}: {r['perplexity']:.3f} (not in the committed table)")
            continue
        allowed = max(want["spread"], MIN_SPREAD * want["perplexity"])
        worse = r["perplexity"] - want["perplexity"]
        ok = worse <= allowed
        ok_all &= ok
        print(f"{'PASS' if ok else 'FAIL'}  {label}: {r['perplexity']:.3f} vs {want['perplexity']:.3f} "
              f"(allowed +{allowed:.3f}; {worse:+.3f})")
    return ok_all


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model_path", help="model folder or .gguf (default: SmolLM2-135M)")
    ap.add_argument("--test", default=str(D.WIKITEXT_TEST), help="default: the shipped WikiText-2 raw test variant")
    ap.add_argument("--calib", default=str(D.WIKITEXT_VALID), help="default: the shipped WikiText-2 validation split")
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seeds", default="0,1,2", help="calibration draws: each calibrated row is measured once per seed")
    ap.add_argument("--group_size", type=int, default=64, help="a group size that divides the model's widths")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--rows", default=None, help="only the rows whose label contains one of these comma-separated "
                    "words (e.g. RTN,GPTQ); the orderings whose rows all ran are checked")
    ap.add_argument("--check", action="store_true", help=f"compare every row with {EXPECTED.name}")
    ap.add_argument("--write", action="store_true", help=f"write the measured rows to {EXPECTED.name}")
    args = ap.parse_args()
    wanted = [w.strip().lower() for w in args.rows.split(",")] if args.rows else None
    table = [(label, text) for label, text in rows(args.group_size)
             if not wanted or label == "dense" or any(w in label.lower() for w in wanted)]
    results, protocol = measure(args, table)
    ok = orderings(results, args.group_size)
    if args.check:
        ok &= check(results, protocol)
    if args.write:
        old = json.loads(EXPECTED.read_text())["rows"] if EXPECTED.exists() else {}
        EXPECTED.write_text(json.dumps({"protocol": protocol, "rows": {**old, **results}}, indent=1) + "\n")
        print(f"wrote {len(results)} rows to {EXPECTED}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
