"""Heuristic allocations a dynamic study measures as its baselines.

- OWL (Yin et al., "Outlier Weighed Layerwise Sparsity", ICML 2024), as its reference (luuyin/OWL) defines it:
  a block's outlier ratio is the share of its weights whose |W_ij|·||X_j|| exceeds M times the mean of that score
  over the block's linears together (one mean over their concatenation); the ratios are mapped linearly onto
  [0, 2λ] and each block's sparsity is the target's minus its deviation from their mean (more outliers, less
  sparsity); here each block takes the level nearest that sparsity, repaired to meet the target exactly.
  M = 5, λ = 0.08 (the reference's LLaMA settings). Only for pruning levels.
- ShortGPT (Men et al., 2024): a block's importance is 1 - cos(its input, its output), averaged over every
  calibration token of the dense model; the least important blocks are removed first (both sub-blocks) until the
  target is met. Only with depth pruning.
- Random profiles: every unit one level less compressed than the uniform profile, then one level more on units
  drawn at random until the profile meets the target (EvoPress's initialisation at a fractional target); the best
  of N is the baseline where no uniform level hits the target.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch import nn

from compactmind.dynamic import DROP, LevelDB, Profile
from compactmind.models import block_linears, decoder_layers

OUTLIER_M = 5.0
OWL_LAMBDA = 0.08


# ---- OWL ---------------------------------------------------------------------------------------------------


@torch.inference_mode()
def outlier_ratios(model: nn.Module, samples: torch.Tensor, m: float = OUTLIER_M) -> list[float]:
    """Per decoder block, the share of its weights whose |W_ij|·||X_j|| exceeds m times the mean score over the
    block's linears together, on the dense model's calibration activations."""
    from compactmind.calibration import InputNorms, run_body
    from compactmind.methods._wanda import wanda_score

    linears = dict(block_linears(model))
    norms = {name: InputNorms(lin) for name, lin in linears.items()}
    handles = [lin.register_forward_hook(lambda mod, a, o, acc=norms[name]: acc.add_batch(a[0], o))
               for name, lin in linears.items()]
    try:
        run_body(model, samples)
    finally:
        for h in handles:
            h.remove()
    by_block: dict[int, list[torch.Tensor]] = {}
    for i, layer in enumerate(decoder_layers(model)):
        ids = {id(mod) for mod in layer.modules()}
        by_block[i] = [wanda_score(lin.weight, norms[name].sq).reshape(-1) for name, lin in linears.items()
                       if id(lin) in ids]
    out = []
    for i in range(len(by_block)):
        score = torch.cat(by_block[i])
        out.append(float((score > m * score.mean()).float().mean()))
    return out


def owl_profile(db: LevelDB, ratios: list[float], feasible: Callable[[Profile], bool],
                lam: float = OWL_LAMBDA) -> Profile | None:
    """OWL's per-block sparsities around the uniform profile's, mapped to the nearest pruning level, repaired to
    meet the target; None without pruning levels or a feasible uniform profile."""
    uniform = db.uniform(feasible)
    sparsity = [lv.manifest.get("sparsity", 0.0) for lv in db.levels]
    if uniform is None or max(sparsity) == 0:
        return None
    r = torch.tensor(ratios, dtype=torch.float64)
    span = r.max() - r.min()
    d = (r - r.min()) / span * 2 * lam if span > 0 else torch.zeros_like(r)
    block_units = [u for u, unit in enumerate(db.units) if unit.kind != "embedding"]
    mean = sum(sparsity[uniform.levels[u]] for u in block_units) / max(1, len(block_units))
    levels = list(uniform.levels)
    for u in block_units:
        want = mean - float(d[db.units[u].block] - d.mean())
        levels[u] = min(range(len(db.levels)), key=lambda i: abs(sparsity[i] - want))
    order = sorted(block_units, key=lambda u: ratios[db.units[u].block])  # fewest outliers first
    return repaired(db, levels, order, feasible)


def repaired(db: LevelDB, levels: list[int], order: list[int], feasible) -> Profile | None:
    """Compress the first units of `order` more until the profile is feasible, then give the last ones less
    compression while it stays feasible (what is left of the budget spent where it matters most)."""
    top = len(db.levels) - 1
    while not feasible(Profile(tuple(levels))):
        u = next((u for u in order if levels[u] < top), None)
        if u is None:
            return None
        levels[u] += 1
    for u in reversed(order):
        while levels[u] > 0 and feasible(Profile(tuple(levels[:u] + [levels[u] - 1] + levels[u + 1:]))):
            levels[u] -= 1
    return Profile(tuple(levels))


# ---- ShortGPT --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def block_importance(model: nn.Module, samples: torch.Tensor) -> list[float]:
    """ShortGPT's block importance: 1 - cos(input, output) of each decoder block, averaged over every
    calibration token of the dense model."""
    layers = decoder_layers(model)
    sums, count = [0.0] * len(layers), 0
    seen: dict[int, torch.Tensor] = {}

    def hook(i):
        def take(_module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += float((1 - cos).sum())
            seen[i] = cos
        return take

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        device = next(model.parameters()).device
        body = getattr(model, "model", model)
        for row in samples:
            body(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            count += row.numel()
    finally:
        for h in handles:
            h.remove()
    return [s / count for s in sums]


def shortgpt_profile(db: LevelDB, importance: list[float], feasible) -> Profile | None:
    """The least important blocks removed (every unit of theirs dropped), others at the least compressing level,
    until the profile meets the target; None without a drop option."""
    if not db.depth:
        return None
    levels = [0] * len(db.units)
    for block in sorted(range(len(importance)), key=lambda b: importance[b]):
        if feasible(Profile(tuple(levels))):
            break
        for u, unit in enumerate(db.units):
            if unit.block == block and db.options[u][-1].label == DROP:
                levels[u] = len(db.options[u]) - 1
    return Profile(tuple(levels)) if feasible(Profile(tuple(levels))) else None


# ---- random profiles ---------------------------------------------------------------------------------------------


def random_profiles(db: LevelDB, feasible, n: int, seed: int) -> list[Profile]:
    """n distinct feasible profiles drawn as EvoPress initialises at a fractional target (see the docstring)."""
    uniform = db.uniform(feasible)
    if uniform is None:
        return []
    rng = random.Random(seed)
    out: list[Profile] = []
    for _ in range(20 * n):
        levels = [max(0, i - 1) for i in uniform.levels]
        movable = [u for u, unit in enumerate(db.units) if unit.kind != "embedding"]
        while not feasible(Profile(tuple(levels))):
            choices = [u for u in movable if levels[u] < len(db.options[u]) - 1
                       and db.options[u][levels[u] + 1].label != DROP]
            if not choices:
                break
            levels[rng.choice(choices)] += 1
        profile = Profile(tuple(levels))
        if feasible(profile) and profile not in out:
            out.append(profile)
        if len(out) == n:
            break
    return out
