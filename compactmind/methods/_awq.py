"""AWQ: activation-aware weight quantization (Lin, Tang, Tang, Yang, Dang, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024; arXiv 2023), as the reference implementation
(mit-han-lab/llm-awq, auto_scale and auto_clip) does it.

A few input channels carry large activations, and their weights matter most. AWQ scales those weight columns up
before quantization and folds the inverse scale into the operation that feeds them, which leaves the
full-precision function unchanged. Block by block, with inputs from the full-precision (scaled and clipped, not
yet quantized) predecessors:
1. scales: for each group of linears sharing an input (q/k/v after the attention norm, o after v when shapes
   allow, gate/up after the MLP norm, down after up), s = mean|x|^alpha normalised by sqrt(max s * min s), alpha
   on a grid of 20 values in [0, 1); the loss is the squared error of the output of what the group feeds (the
   whole attention for q/k/v, the whole MLP for gate/up, the linear itself for o and down) with the group's
   weights quantized, over every calibration token, against its full-precision output;
2. clipping: for every linear but q and k, each output row and group keeps the clip value max|w| * (1 - i/20),
   i < 10, that minimises its outputs' squared error on 512 evenly spaced calibration tokens;
3. after the last block, every block linear is quantized round-to-nearest per group.
Embeddings, norms and the head are kept in FP16.

Parameters: `bits`, `group_size` (0: per output channel), `symmetric`.
"""

from __future__ import annotations

import torch

from compactmind.calibration import InputSample, require, sequential_
from compactmind.errors import IncompatiblePipelineError
from compactmind.methods._quant import (WeightQuantizer, cast_rest_to_fp16_, groups_of, rtn, rtn_quantize,
                                        write_quantized_)
from compactmind.models import block_linears, decoder_layers
from compactmind.registry import register_method
from compactmind.space import Categorical

GRID = 20
CLIP_STEPS = 10  # shrink max|w| by up to 50%, in steps of 5%
CLIP_TOKENS = 512
MAX_ROWS = 65536  # calibration tokens kept per input (every one, up to this many)


def scaling_groups(layer) -> list[tuple[torch.nn.Module, list[str], str, str]]:
    """(operation feeding the inputs, linears that read them, linear whose recorded input is used, what the
    loss is measured on: 'attention', 'mlp' or a linear's name)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               "self_attn.q_proj", "attention")]
    if attn.v_proj.out_features == attn.o_proj.in_features:
        groups.append((attn.v_proj, ["self_attn.o_proj"], "self_attn.o_proj", "self_attn.o_proj"))
    groups.append((layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_proj", "mlp"))
    groups.append((mlp.up_proj, ["mlp.down_proj"], "mlp.down_proj", "mlp.down_proj"))
    return groups


def _sub_block(layer, target: str, modules: dict, samples: list, rows: torch.Tensor):
    """The function whose output the scale search compares: over every sample (attention mixes tokens) or
    over the recorded input rows."""
    if target == "attention":
        def run():
            return [layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)[0] for x, kw in samples]
    elif target == "mlp":
        def run():
            return [layer.mlp(layer.post_attention_layernorm(x)) for x, _ in samples]
    else:
        def run():
            return [modules[target](rows)]
    return run


def search_scale(run, linears: list[torch.nn.Linear], x: torch.Tensor, bits: int, group_size: int,
                 symmetric: bool) -> torch.Tensor:
    """The per-input-channel scale (s = mean|x|^alpha, normalised) minimising the error of run()'s outputs
    when the linears' weights are quantized as Q(W diag(s)) diag(s)^-1."""
    reference = [o.float() for o in run()]
    mean_abs = x.float().abs().mean(0).clamp(min=1e-4)
    originals = [lin.weight.data.clone() for lin in linears]
    best, best_s = float("inf"), torch.ones_like(mean_abs)
    try:
        for i in range(GRID):
            s = mean_abs.pow(i / GRID).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(linears, originals):
                lin.weight.data = (rtn(w.float() * s, bits, group_size, symmetric) / s).to(w.dtype)
            loss = sum((o.float() - r).pow(2).sum().item() for o, r in zip(run(), reference))
            if loss < best:
                best, best_s = loss, s
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    return best_s


def search_clip(weight: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Per output row and group, the clip value max|w| * (1 - i/GRID) (i < CLIP_STEPS) whose quantized weights
    give the outputs closest to the full-precision ones on CLIP_TOKENS tokens; returns [rows, groups]."""
    x = x.float()[:: max(1, x.shape[0] // CLIP_TOKENS)][:CLIP_TOKENS]
    w = weight.float()
    spans = groups_of(w.shape[1], group_size)
    best = torch.stack([w[:, s:e].abs().amax(1) for s, e in spans], 1)  # [rows, groups]
    errors = torch.full_like(best, float("inf"))
    reference = torch.stack([x[:, s:e] @ w[:, s:e].T for s, e in spans], 2)  # [tokens, rows, groups]
    top = best.clone()
    for i in range(CLIP_STEPS):
        limit = top * (1 - i / GRID)
        clipped = torch.cat([w[:, s:e].clamp(-limit[:, g:g + 1], limit[:, g:g + 1])
                             for g, (s, e) in enumerate(spans)], 1)
        q = rtn(clipped, bits, group_size, symmetric)
        out = torch.stack([x[:, s:e] @ q[:, s:e].T for s, e in spans], 2)
        err = (out - reference).pow(2).mean(0)
        better = err < errors
        errors[better], best[better] = err[better], limit[better]
    return best


def _clip_(linear: torch.nn.Linear, limit: torch.Tensor, group_size: int) -> None:
    w = linear.weight.data
    for g, (s, e) in enumerate(groups_of(w.shape[1], group_size)):
        bound = limit[:, g:g + 1].to(w.dtype)
        w[:, s:e] = w[:, s:e].clamp(-bound, bound)


@register_method("awq")
class AWQ(WeightQuantizer):
    summary = "activation-aware channel scales and clipping, then k-bit RTN (Lin et al. 2023)"
    separable = False  # scales norms and the linears they feed together
    needs_calibration = True

    space = {"bits": Categorical([3, 4]), "group_size": Categorical([128]), "symmetric": Categorical([False])}

    def check(self, model, params):
        layer = decoder_layers(model)[0]
        try:
            scaling_groups(layer)
        except AttributeError:
            raise IncompatiblePipelineError("awq needs Llama-style blocks (norms before q/k/v and gate/up, "
                                            "up before down).") from None

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        calib = require(calib, self.name)
        bits, group, sym = params.bits, params.group_size, params.symmetric

        def solve(_i, layer, stats, samples):
            modules = dict(layer.named_modules())
            inputs = {name: acc.x for name, acc in stats.items()}
            for prev, names, source, target in scaling_groups(layer):
                linears = [modules[n] for n in names]
                run = _sub_block(layer, target, modules, samples, inputs[source])
                s = search_scale(run, linears, inputs[source], bits, group, sym)
                if prev.weight.dim() == 1:  # a norm: scale its output channels
                    prev.weight.div_(s.to(prev.weight.dtype))
                else:  # a linear: scale its output rows
                    prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
                for lin in linears:
                    lin.weight.mul_(s.to(lin.weight.dtype))
                scaled = inputs[source] / s.to(inputs[source].dtype)
                for name in names:  # what these linears now see (the clip search below reads it)
                    inputs[name] = scaled
            for name, lin in modules.items():
                if isinstance(lin, torch.nn.Linear) and name not in ("self_attn.q_proj", "self_attn.k_proj"):
                    _clip_(lin, search_clip(lin.weight, inputs[name], bits, group, sym), group)

        sequential_(model, calib, lambda name, lin: InputSample(lin, MAX_ROWS) if name in _RECORDED else None, solve)
        for _, lin in block_linears(model):  # quantized once every block has its scales and clipping
            write_quantized_(lin, rtn_quantize(lin.weight, bits, group, sym), bits, group, sym)
        cast_rest_to_fp16_(model)


_RECORDED = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
