"""GPTQ against a reference written from the paper, on one SmolLM2 layer: the same Hessian (from the quality
protocol's calibration samples), the same weights, every setting of symmetric / act order / static groups.

Prints, per setting, the share of codes that differ and each solver's layer error tr((W - Q) H (W - Q)^T)
(the proxy loss GPTQ minimises, proportional to ||WX - QX||^2 over the calibration tokens) beside RTN's. The
reference is tests/test_golden.py's reference_gptq (one column at a time, no lazy blocks).

    python scripts/gptq_layer.py --layer 15 --linears self_attn.q_proj,mlp.down_proj
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from compactmind import data as D  # noqa: E402
from compactmind import models  # noqa: E402
from compactmind.calibration import Calibration, Hessian, sequential_  # noqa: E402
from compactmind.methods._quant import gptq, rtn  # noqa: E402
from test_golden import reference_gptq  # noqa: E402


class _Have(Exception):
    pass


def layer_hessians(model, calib: Calibration, layer: int, names: list[str]) -> dict:
    """The layer's weights and Hessians with the blocks before it dense (the loop changes nothing here)."""
    found = {}

    def take(i, block, stats, _samples):
        if i == layer:
            modules = dict(block.named_modules())
            found.update({n: (modules[n].weight.detach().float().clone(), stats[n].H.clone()) for n in names})
            raise _Have

    try:
        sequential_(model, calib, lambda _n, lin: Hessian(lin), take)
    except _Have:
        pass
    return found


def error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    d = (w - q).double()
    return float(torch.trace(d @ H.double() @ d.T))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--linears", default="self_attn.q_proj,mlp.down_proj")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group_size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    loaded = models.load_model(None, torch.device("cpu"), torch.float32)
    data = D.prepare(loaded.tokenizer, D.resolve_sources(None, None), args.seq_len, args.samples, 1, seed=args.seed)
    names = args.linears.split(",")
    layers = layer_hessians(loaded.model, Calibration(data.calib), args.layer, names)
    print(f"SmolLM2 block {args.layer}, W{args.bits} g{args.group_size}, {args.samples} x {args.seq_len} "
          f"calibration tokens (seed {args.seed}); error = tr((W-Q) H (W-Q)^T)")
    print(f"{'linear':18} {'symmetric':9} {'act order':9} {'groups':7} {'codes differ':>12} "
          f"{'ours':>10} {'reference':>10} {'RTN':>10}")
    for name in names:
        w, H = layers[name]
        base = error(w, rtn(w, args.bits, args.group_size, True), H), error(w, rtn(w, args.bits, args.group_size,
                                                                                   False), H)
        for symmetric in (True, False):
            for act_order in (True, False):
                for static in (True, False):
                    q = gptq(w, H, args.bits, args.group_size, symmetric, act_order, static_groups=static)
                    scale = q.scale.float().repeat_interleave(args.group_size, 1)
                    ours = torch.round(q.weight / scale) + q.zero.float().repeat_interleave(args.group_size, 1)
                    codes, values = reference_gptq(w, H, args.bits, args.group_size, symmetric, act_order, static)
                    differ = (ours != codes).float().mean().item()
                    print(f"{name:18} {str(symmetric):9} {str(act_order):9} {'static' if static else 'dynamic':7} "
                          f"{differ:12.2%} {error(w, q.weight, H):10.3f} {error(w, values, H):10.3f} "
                          f"{base[0 if symmetric else 1]:10.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
