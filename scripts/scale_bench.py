"""What each stage costs a Llama-2-7B user: peak host and device memory and seconds per stage, measured on
Llama-2-7B's real shape (hidden 4096, 32 heads, MLP 11008, vocabulary 32000) with random BF16 weights at 2 and 4
decoder layers, so the per-layer slope is measured, not guessed, then extrapolated to 32, 40 and 80 layers.

Stages: load (a saved folder through compactmind's loader), the pristine snapshot, each calibrated method
(GPTQ W4 g128, SparseGPT 50%, Wanda 50%; AWQ W4 g128 with --awq), a level database of two GPTQ levels and one
assembly, an evaluation, and the export in each format (packed, compressed-tensors and dense of the GPTQ trial;
GGUF of a Q4_K trial). Memory: the peak resident set of this process during the stage (Linux VmHWM, reset before
it) and, on a GPU, torch's peak allocation.

Extrapolation: a stage's figure at L layers is a + b L from the 2- and 4-layer runs; 13B (40 layers of width 5120,
MLP 13824) and 70B (80 layers of width 8192, MLP 28672, 8 key/value heads) scale the per-layer slope by their
per-layer parameter count over 7B's (memory and time of these stages follow the weights; the calibration
tokens are the same). "fits" compares with one 141 GB GPU and 256 GB of host memory.

    .venv/bin/python scripts/scale_bench.py [--layers 2,4] [--gpu] [--awq] [--json out.json] [--tiny]

--tiny uses a small shape (CI-sized: scripts/gpu_check.sh --dry-run).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, heads, kv heads, MLP, vocabulary
    "7b": (4096, 32, 32, 11008, 32000), "13b": (5120, 40, 40, 13824, 32000), "70b": (8192, 64, 8, 28672, 32000),
    "tiny": (256, 4, 4, 512, 2000),
}
LAYERS = {"7b": 32, "13b": 40, "70b": 80}
GPU_BYTES, HOST_BYTES = 141e9, 256e9


def layer_params(shape: str) -> int:
    h, heads, kv, mlp, _ = SHAPES[shape]
    return 2 * h * h + 2 * h * (h * kv // heads) + 3 * h * mlp


def config(shape: str, layers: int):
    from transformers import LlamaConfig

    h, heads, kv, mlp, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=mlp,
                       vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096,
                       tie_word_embeddings=False)


class Meter:
    """Seconds and peak memory of a stage."""

    def __init__(self, device: torch.device):
        self.device, self.stages = device, {}

    def __call__(self, name: str, fn):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        before = _status("VmRSS")
        started = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        host = _status("VmHWM")
        device = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else 0
        self.stages[name] = {"seconds": seconds, "host_peak": host, "host_extra": host - before, "device_peak": device}
        print(f"  {name:<34} {seconds:8.1f} s  host peak {host / 2**30:6.2f} GiB (+{(host - before) / 2**30:.2f} over "
              f"the resident set before it)  device peak {device / 2**30:6.2f} GiB", flush=True)
        return out


def _status(key: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(f"{key}:"))


def run(layers: int, shape: str, device: torch.device, awq: bool, work: Path) -> dict:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from compactmind import models
    from compactmind import pipeline as pl
    from compactmind.data import Dataset
    from compactmind.deploy import FORMATS
    from compactmind.dynamic import Profile, open_db
    from compactmind.executor import Executor

    meter = Meter(device)
    folder = work / f"model-{layers}"
    if not folder.exists():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config(shape, layers)).to(torch.bfloat16)
        model.save_pretrained(folder)
        from pydoc_data.topics import topics
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()  # a small real BPE vocabulary: what the exports write, not what is measured
        bpe.train_from_iterator([topics[k] for k in sorted(topics)][:200], vocab_size=500, min_frequency=2)
        PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer).save_pretrained(folder)
        del model
    loaded = meter("load", lambda: models.load_model(str(folder), device, torch.bfloat16))
    g = torch.Generator().manual_seed(1)
    seq = 2048 if device.type == "cuda" else 512
    vocab = SHAPES[shape][4]
    data = Dataset(torch.randint(0, vocab, (2, seq), generator=g), torch.randint(0, vocab, (8, seq), generator=g),
                   seq, {"calib_source": "random ids", "calib_tokens": 8 * seq, "calib_ids": "random"})
    executor = meter("pristine snapshot", lambda: Executor(loaded, data, 0, 32))
    methods = {"GPTQ W4 g128": "gptq(bits=4, group_size=128)", "SparseGPT 50%": "sparsegpt(sparsity=0.5)",
               "Wanda 50%": "wanda(sparsity=0.5)", **({"AWQ W4 g128": "awq(bits=4, group_size=128)"} if awq else {})}
    for label, text in methods.items():
        meter(label, lambda: executor.compress(pl.parse(text)))
    meter("evaluation (2 windows)", lambda: executor.evaluate(1))
    executor.compress(pl.parse(methods["GPTQ W4 g128"]))
    for fmt in ("packed", "compressed-tensors", "dense"):
        writer = FORMATS[fmt].impl()
        meter(f"export {fmt}", lambda: writer.write(loaded.model, loaded.tokenizer, work / f"{fmt}-{layers}", {}, 32))
    executor.compress(pl.parse("gguf(type=Q4_K)"))
    meter("export gguf", lambda: FORMATS["gguf"].impl().write(loaded.model, loaded.tokenizer, work / f"gguf-{layers}",
                                                             {}, 32))
    levels = [pl.parse("gptq(bits=3, group_size=128)"), pl.parse("gptq(bits=4, group_size=128)")]
    db = meter("level database (2 GPTQ levels)", lambda: open_db(executor, levels, "block", work / "levels",
                                                                {"layers": layers}))
    n = len(db.units)
    meter("one assembly", lambda: executor.assemble(db, Profile(tuple(i % 2 for i in range(n)))))
    meter("assembly changing one unit", lambda: executor.assemble(db, Profile(tuple((i + (i == 0)) % 2
                                                                                    for i in range(n)))))
    meter("dynamic trial's evaluation", lambda: executor.evaluate(1))
    return meter.stages


def extrapolate(runs: dict[int, dict], shape: str) -> list[str]:
    (l1, a), (l2, b) = sorted(runs.items())[:2]
    lines = [f"{'stage':<34}" + "".join(f"{f'{n} layers':>22}" for n in runs) + "".join(
        f"{name + ' (' + str(LAYERS[name]) + ')':>26}" for name in LAYERS)]
    for stage in a:
        cells = [f"{r[stage]['host_peak'] / 2**30:7.2f}/{r[stage]['device_peak'] / 2**30:5.2f}G "
                 f"{r[stage]['seconds']:5.0f}s" for r in runs.values()]
        out = []
        for name, layers in LAYERS.items():
            scale = layer_params(name) / layer_params(shape)

            def at(key):
                slope = (b[stage][key] - a[stage][key]) / (l2 - l1)
                return a[stage][key] - slope * l1 + slope * scale * layers  # the rest, plus the layers
            host, dev, sec = at("host_peak"), at("device_peak"), at("seconds")
            fits = "fits" if host < HOST_BYTES and dev < GPU_BYTES else "DOES NOT FIT"
            out.append(f"{host / 1e9:7.1f}/{dev / 1e9:5.1f}GB {sec / 60:5.0f}min {fits}")
        lines.append(f"{stage:<34}" + "".join(f"{c:>22}" for c in cells) + "".join(f"{c:>26}" for c in out))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--awq", action="store_true", help="also AWQ (about 6x GPTQ's time on a CPU)")
    ap.add_argument("--tiny", action="store_true", help="a small shape: a check that the script runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from compactmind import models

    device = models.pick_device(gpu=args.gpu)
    shape = "tiny" if args.tiny else "7b"
    runs = {}
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        for layers in (int(n) for n in args.layers.split(",")):
            print(f"{shape} shape, {layers} decoder layers, BF16 weights, on {device}:", flush=True)
            runs[layers] = run(layers, shape, device, args.awq, Path(tmp))
            gc.collect()
    print("\nhost/device peak and seconds; extrapolated (per-layer slope, scaled by the per-layer weights):")
    print("\n".join(extrapolate(runs, shape)))
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "device": str(device), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
