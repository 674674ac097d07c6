"""The checks a lent GPU should run, in one go (at most 8 minutes on an H100/H200), written to one JSON file:
  scale      scripts/scale_bench.py at 4 decoder layers of Llama-2-7B's shape, on the GPU: load, snapshot, GPTQ,
             SparseGPT, Wanda, evaluation, every export, a level database, assemblies and a dynamic trial's
             evaluation, each with seconds and peak host and device memory;
  gptq_block one decoder block's GPTQ W4 g128 (the scale stage's seconds over its blocks);
  eval       evaluation throughput of ours against a plain Hugging Face labels loop on the same windows, FP16.
--dry-run: the same on the CPU with a small shape (a check that the script runs, CI-sized).

    python scripts/gpu_check.py --out gpu_check.json [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_bench  # noqa: E402


def throughput(model, windows: torch.Tensor) -> dict:
    """Tokens per second of ours and of the plain labels loop, and their perplexities."""
    from compactmind.evaluate import perplexity

    device = next(model.parameters()).device
    started = time.perf_counter()
    with torch.no_grad():
        losses = [model(input_ids=w[None].to(device), labels=w[None].to(device)).loss.float().item() for w in windows]
    plain_s = time.perf_counter() - started
    ours = perplexity(model, windows, batch_size=1)
    tokens = windows.numel()
    return {"plain_tokens_per_s": tokens / plain_s, "ours_tokens_per_s": tokens / ours.seconds,
            "ratio": plain_s / ours.seconds, "plain_perplexity": math.exp(sum(losses) / len(losses)),
            "ours_perplexity": ours.perplexity}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, a small shape")
    args = ap.parse_args()
    from compactmind import models

    device = torch.device("cpu") if args.dry_run else models.pick_device(gpu=True)
    shape, layers = ("tiny", 2) if args.dry_run else ("7b", 4)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "shape": shape,
              "layers": layers, "torch": torch.__version__}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        stages = scale_bench.run(layers, shape, device, False, Path(tmp))
        result["scale"] = stages
        result["gptq_block_seconds"] = stages["GPTQ W4 g128"]["seconds"] / layers
        loaded = models.load_model(str(Path(tmp) / f"model-{layers}"), device,
                                   torch.float16 if device.type == "cuda" else torch.float32)
        vocab = scale_bench.SHAPES[shape][4]
        windows = torch.randint(0, vocab, (4, 2048 if device.type == "cuda" else 128),
                                generator=torch.Generator().manual_seed(3))
        result["eval"] = throughput(loaded.model, windows)
    result["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "scale"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
