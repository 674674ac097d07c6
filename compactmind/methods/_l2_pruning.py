"""L2 structured pruning: remove whole MLP channels and/or attention heads with the smallest L2 norm.

Magnitude-based structured pruning in the spirit of Li et al., "Pruning Filters for Efficient ConvNets"
(ICLR 2017), applied to transformer blocks as in LLM-Pruner (Ma et al., 2023) without its gradient scores.
An MLP channel j of a gated MLP is row j of gate_proj and up_proj and column j of down_proj; its score is the
L2 norm of all those weights together, and the lowest-scoring channels are cut out of the three matrices.
An attention head is its rows of q_proj and its columns of o_proj (plus k/v rows when heads do not share
key/value heads); with grouped-query attention the same number of query heads is removed from every
key/value group so the grouping stays regular. The layers really shrink, so the size accounting counts the
removed weights as gone.

`score="activation"` weighs each structure by what it contributes to the block's output on calibration data
(Wanda-sp / FLAP in spirit: An et al., "Fluctuation-based Adaptive Structured Pruning", AAAI 2024): an MLP channel
j by ||down_proj[:, j]|| * sqrt(E[h_j^2]), with h = act(gate) * up its activation, a head by
sqrt(sum over its columns c of ||o_proj[:, c]||^2 * E[x_c^2]), x the attention output o_proj reads; statistics from
the shared layer-by-layer calibration loop. A weight norm alone cannot see the few channels that carry massive
activations (the "super weights" of Yu et al., 2024): on SmolLM2 removing 5% of the MLP channels by weight norm
takes perplexity from 30 to thousands, by the activation-aware score it stays within a few percent (README).

Parameters: `sparsity`, the fraction of channels (or heads) removed in every block; `scope`, which structures
are pruned: "mlp", "heads" or "both"; `score`: "activation" (default) or "weight" (the L2 norm alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compactmind.calibration import InputNorms, require, sequential_
from compactmind.errors import IncompatiblePipelineError
from compactmind.formats import QuantParams, entry, record
from compactmind.methods._prune_common import check_sparsity
from compactmind.models import decoder_layers
from compactmind.registry import Kind, Method, register_method
from compactmind.space import Categorical, Float


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the n_keep highest scores, in their original order."""
    return scores.topk(n_keep).indices.sort().values


def slice_linear_(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only `index` along `dim` of the weight (0: output rows, 1: input columns)."""
    index = index.to(linear.weight.device)
    e = entry(linear)
    q = e.qparams
    if q is not None:  # quantized by an earlier step: keep its scales in step with the kept rows/columns
        if dim == 0:
            q = QuantParams(q.scale[index.to(q.scale.device)], q.zero[index.to(q.zero.device)], q.column_group)
        else:
            cols = linear.weight.shape[1]
            groups = q.column_group
            if groups is None:
                groups = torch.arange(cols) // (e.format.group_size or cols)
            q = QuantParams(q.scale, q.zero, groups[index.cpu()])
        record(linear, "weight", qparams=q)
    with torch.inference_mode(False):  # ordinary parameters even inside the calibration loop's inference mode
        linear.weight = nn.Parameter(linear.weight.data.index_select(dim, index).clone(), requires_grad=False)
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).clone(), requires_grad=False)
    if dim == 0:
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def mlp_channel_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                       activation_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Each MLP channel's score: the L2 norm of its weights, or (activation_sq: E[h_j^2] of the channel's
    activation) the size of what it adds to the output, ||down[:, j]|| * sqrt(E[h_j^2])."""
    if activation_sq is not None:
        return down.float().pow(2).sum(0).sqrt() * activation_sq.to(down.device).float().sqrt()
    return (gate.float().pow(2).sum(1) + up.float().pow(2).sum(1) + down.float().pow(2).sum(0)).sqrt()


def _mlp(layer):
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    return mlp


def _attn(layer):
    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
        return None
    return attn


def _heads_removed(attn, sparsity: float) -> tuple[int, int, int]:
    """(kv heads, query heads per kv head, how many are removed: per group, or whole kv heads when n_rep == 1)."""
    n_kv = attn.k_proj.out_features // attn.head_dim
    n_rep = attn.q_proj.out_features // attn.head_dim // n_kv
    units = n_rep if n_rep > 1 else n_kv
    return n_kv, n_rep, round(sparsity * units)


SCORES = ("activation", "weight")


@register_method("l2_pruning")
class L2Pruning(Method):
    summary = "structured: removes the MLP channels / attention heads of smallest L2 norm"
    kind = Kind.PRUNING
    separable = False  # removes channels across linears
    needs_calibration = True  # score="activation"
    version = 2  # 2: the activation-aware score by default

    @dataclass(frozen=True)
    class Params:
        sparsity: float = 0.0
        scope: str = "mlp"
        score: str = "activation"

        def __post_init__(self):
            check_sparsity(self.sparsity)
            if self.score not in SCORES:
                raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")

    space = {"sparsity": Float(0.1, 0.3, step=0.1), "scope": Categorical(["mlp", "heads", "both"]),
             "score": Categorical(SCORES, searched=["activation"])}
    identity = Params(sparsity=0.0, scope="both")

    def calibrates(self, params) -> bool:
        return params.score == "activation"

    def check(self, model, params):
        layer = decoder_layers(model)[0]
        if params.scope in ("mlp", "both") and _mlp(layer) is None:
            raise IncompatiblePipelineError("l2_pruning of MLP channels needs gated MLPs (gate/up/down projections).")
        if params.scope in ("heads", "both"):
            attn = _attn(layer)
            if attn is None:
                raise IncompatiblePipelineError("l2_pruning of heads needs q/k/v/o attention projections.")
            n_kv, n_rep, removed = _heads_removed(attn, params.sparsity)
            units = n_rep if n_rep > 1 else n_kv
            if params.sparsity > 0 and removed == 0:
                raise IncompatiblePipelineError(
                    f"l2_pruning(sparsity={params.sparsity}) removes no head here: heads are pruned in steps of "
                    f"1/{units} (this model has {n_rep} query heads per key/value head).")
            if removed >= units:
                raise IncompatiblePipelineError(f"l2_pruning(sparsity={params.sparsity}) would remove every head.")

    def effect(self, model, params):
        """The channels and heads really removed per block: fractions that round to the same counts are one."""
        layer = decoder_layers(model)[0]
        mlp, attn = _mlp(layer), _attn(layer)
        channels = round(params.sparsity * mlp.gate_proj.out_features) if mlp and params.scope != "heads" else 0
        heads = _heads_removed(attn, params.sparsity)[2] if attn and params.scope != "mlp" else 0
        return ("l2", channels, heads)

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        if params.sparsity <= 0:
            return
        if params.score == "weight":
            for layer in decoder_layers(model):
                self._prune(layer, params, {})
            return
        calib = require(calib, "l2_pruning(score=activation)")
        wanted = {"mlp.down_proj", "self_attn.o_proj"}
        sequential_(model, calib, lambda name, lin: InputNorms(lin) if name in wanted else None,
                    lambda _i, layer, stats, _samples: self._prune(layer, params, stats))

    def _prune(self, layer, params, stats: dict) -> None:
        """stats: the InputNorms of down_proj and o_proj (empty: weight norms alone)."""
        down, o = stats.get("mlp.down_proj"), stats.get("self_attn.o_proj")
        if params.scope in ("mlp", "both"):
            self._prune_mlp(_mlp(layer), params.sparsity, down.sq if down is not None else None)
        if params.scope in ("heads", "both"):
            self._prune_heads(_attn(layer), params.sparsity, o.sq if o is not None else None)

    @staticmethod
    def _prune_mlp(mlp, sparsity: float, activation_sq: torch.Tensor | None = None) -> None:
        width = mlp.gate_proj.out_features
        scores = mlp_channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, activation_sq)
        keep = keep_top(scores, width - round(sparsity * width))
        slice_linear_(mlp.gate_proj, keep, 0)
        slice_linear_(mlp.up_proj, keep, 0)
        slice_linear_(mlp.down_proj, keep, 1)

    @staticmethod
    def _prune_heads(attn, sparsity: float, activation_sq: torch.Tensor | None = None) -> None:
        d = attn.head_dim
        n_kv, n_rep, removed = _heads_removed(attn, sparsity)
        if removed == 0:
            return
        o_cols = attn.o_proj.weight.float().pow(2).sum(0)  # ||o_proj[:, c]||^2 per input column
        if activation_sq is not None:  # what each head adds to the output, on calibration data
            scores = (o_cols * activation_sq.to(o_cols.device).float()).view(n_kv * n_rep, d).sum(1)
        else:
            q = attn.q_proj.weight.float().view(n_kv * n_rep, d, -1).pow(2).sum((1, 2))
            scores = q + o_cols.view(n_kv * n_rep, d).sum(1)  # squared L2 norm of each query head's weights
        if n_rep > 1:  # grouped-query attention: drop `removed` query heads inside every kv group
            per_group = scores.view(n_kv, n_rep)
            kept_heads = torch.cat([keep_top(per_group[g], n_rep - removed) + g * n_rep for g in range(n_kv)])
            kv_keep = None
            attn.num_key_value_groups = n_rep - removed
        else:  # one query head per kv head: drop whole heads
            kv = 0 if activation_sq is not None else attn.k_proj.weight.float().view(n_kv, d, -1).pow(2).sum((1, 2)) \
                + attn.v_proj.weight.float().view(n_kv, d, -1).pow(2).sum((1, 2))
            kept_heads = keep_top(scores + kv, n_kv - removed)
            kv_keep = kept_heads
        rows = (kept_heads.unsqueeze(1) * d + torch.arange(d, device=kept_heads.device)).flatten()
        slice_linear_(attn.q_proj, rows, 0)
        slice_linear_(attn.o_proj, rows, 1)
        if kv_keep is not None:
            kv_rows = (kv_keep.unsqueeze(1) * d + torch.arange(d, device=kv_keep.device)).flatten()
            slice_linear_(attn.k_proj, kv_rows, 0)
            slice_linear_(attn.v_proj, kv_rows, 0)
