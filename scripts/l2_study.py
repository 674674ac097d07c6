"""Structured pruning on SmolLM2: why removing 5% of the MLP channels by weight norm destroys the model, and what
an activation-aware score does instead.

On the demo's protocol (the first 8 windows of 512 tokens of the shipped WikiText-2 test variant, FP32, 4
calibration samples of 512 from the validation split), for each sparsity in --sparsities:
  - l2_pruning(scope=mlp, score=weight): the L2 norm of each channel's gate/up rows and down column;
  - the same channels zeroed by hand (their rows and column set to 0, nothing removed): equal to the above when
    the removal is consistent across gate, up and down;
  - l2_pruning(scope=mlp, score=activation): ||down[:, j]|| * sqrt(E[h_j^2]) on the calibration samples;
and it names the channels with the largest activations and whether the weight score keeps them.

    .venv/bin/python scripts/l2_study.py [--sparsities 0.01,0.02,0.05,0.1,0.2,0.3]
"""

from __future__ import annotations

import argparse
import sys

import torch

from compactmind import data as D
from compactmind import models
from compactmind import pipeline as pl
from compactmind.calibration import InputNorms, sequential_
from compactmind.executor import Executor
from compactmind.methods._l2_pruning import _mlp, keep_top, mlp_channel_scores
from compactmind.models import decoder_layers


def zeroed_by_hand_(model, sparsity: float) -> None:
    """The channels the weight score removes, set to zero instead of removed."""
    for layer in decoder_layers(model):
        mlp = _mlp(layer)
        width = mlp.gate_proj.out_features
        scores = mlp_channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        gone = torch.ones(width, dtype=torch.bool)
        gone[keep_top(scores, width - round(sparsity * width))] = False
        mlp.gate_proj.weight[gone] = 0
        mlp.up_proj.weight[gone] = 0
        mlp.down_proj.weight[:, gone] = 0


def massive_channels(executor, top: int = 3) -> list[tuple[int, int, float, float]]:
    """(block, channel, sqrt(E[h^2]), its activation score's rank among the weight score's kept order) of the
    MLP channels with the largest activations, on the dense model."""
    found = []

    def collect(name, lin):
        return InputNorms(lin) if name == "mlp.down_proj" else None

    def look(i, layer, stats, _samples):
        rms = stats["mlp.down_proj"].sq.sqrt()
        mlp = _mlp(layer)
        weight = mlp_channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        rank = weight.argsort().argsort()  # 0: the first the weight score removes
        for j in rms.topk(top).indices.tolist():
            found.append((i, j, float(rms[j]), float(rank[j]) / len(rank)))

    executor.restore()
    with torch.no_grad():
        sequential_(executor.model, executor.calibration, collect, look)
    executor.restore()
    return sorted(found, key=lambda f: -f[2])[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.01,0.02,0.05,0.1,0.2,0.3")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    args = ap.parse_args()
    loaded = models.load_model(None, torch.device("cpu"), torch.float32)
    data = D.prepare(loaded.tokenizer, D.resolve_sources(None, None), 512, args.samples, args.windows, seed=0)
    ex = Executor(loaded, data)
    ex.restore()
    dense = ex.evaluate(4).perplexity
    print(f"SmolLM2 (dequantized from its Q4_1 file), {args.windows} x 512 test windows, {args.samples} calibration "
          f"samples: dense perplexity {dense:.3f}")
    for block, channel, rms, rank in massive_channels(ex):
        print(f"  block {block} MLP channel {channel}: RMS activation {rms:.1f}; the weight score ranks it at "
              f"{100 * rank:.1f}% (0% is removed first)")
    print(f"{'sparsity':>8} {'weight score':>13} {'zeroed by hand':>15} {'activation score':>17}")
    for s in (float(x) for x in args.sparsities.split(",")):
        weight = ex.compress(pl.parse(f"l2_pruning(sparsity={s}, scope=mlp, score=weight)"))
        w_ppl = ex.evaluate(4).perplexity
        ex.restore()
        with torch.no_grad():
            zeroed_by_hand_(ex.model, s)
        ex._state = "compressed"
        z_ppl = ex.evaluate(4).perplexity
        ex.compress(pl.parse(f"l2_pruning(sparsity={s}, scope=mlp, score=activation)"))
        a_ppl = ex.evaluate(4).perplexity
        print(f"{s:>8.2f} {w_ppl:>13.2f} {z_ppl:>15.2f} {a_ppl:>17.2f}   (ratio {weight.footprint.compression_ratio:.4f})",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
