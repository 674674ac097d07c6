"""L2 structured pruning: remove whole MLP channels and/or attention heads with the smallest L2 norm.

Magnitude-based structured pruning in the spirit of Li et al., "Pruning Filters for Efficient ConvNets"
(ICLR 2017), applied to transformer blocks as in LLM-Pruner (Ma et al., 2023) without its gradient scores.
An MLP channel j of a gated MLP is row j of gate_proj and up_proj and column j of down_proj; its score is the
L2 norm of all those weights together, and the lowest-scoring channels are cut out of the three matrices.
An attention head is its rows of q_proj and its columns of o_proj (plus k/v rows when heads do not share
key/value heads); with grouped-query attention the same number of query heads is removed from every
key/value group so the grouping stays regular. The layers really shrink, so the size accounting counts the
removed weights as gone.

Parameters: `sparsity`, the fraction of channels (or heads) removed in every block; `scope`, which structures
are pruned: "mlp", "heads" or "both".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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
    linear.weight = nn.Parameter(linear.weight.data.index_select(dim, index).clone(), requires_grad=False)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).clone(), requires_grad=False)
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def mlp_channel_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
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


@register_method("l2_pruning")
class L2Pruning(Method):
    summary = "structured: removes the MLP channels / attention heads of smallest L2 norm"
    kind = Kind.PRUNING
    separable = False  # removes channels across linears

    @dataclass(frozen=True)
    class Params:
        sparsity: float = 0.0
        scope: str = "mlp"

        def __post_init__(self):
            check_sparsity(self.sparsity)

    space = {"sparsity": Float(0.1, 0.3, step=0.1), "scope": Categorical(["mlp", "heads", "both"])}
    identity = Params(sparsity=0.0, scope="both")

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
        for layer in decoder_layers(model):
            if params.scope in ("mlp", "both"):
                self._prune_mlp(_mlp(layer), params.sparsity)
            if params.scope in ("heads", "both"):
                self._prune_heads(_attn(layer), params.sparsity)

    @staticmethod
    def _prune_mlp(mlp, sparsity: float) -> None:
        width = mlp.gate_proj.out_features
        scores = mlp_channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        keep = keep_top(scores, width - round(sparsity * width))
        slice_linear_(mlp.gate_proj, keep, 0)
        slice_linear_(mlp.up_proj, keep, 0)
        slice_linear_(mlp.down_proj, keep, 1)

    @staticmethod
    def _prune_heads(attn, sparsity: float) -> None:
        d = attn.head_dim
        n_kv, n_rep, removed = _heads_removed(attn, sparsity)
        if removed == 0:
            return
        q = attn.q_proj.weight.float().view(n_kv * n_rep, d, -1).pow(2).sum((1, 2))
        o = attn.o_proj.weight.float().view(attn.o_proj.out_features, n_kv * n_rep, d).pow(2).sum((0, 2))
        scores = q + o  # squared L2 norm of each query head's weights
        if n_rep > 1:  # grouped-query attention: drop `removed` query heads inside every kv group
            per_group = scores.view(n_kv, n_rep)
            kept_heads = torch.cat([keep_top(per_group[g], n_rep - removed) + g * n_rep for g in range(n_kv)])
            kv_keep = None
            attn.num_key_value_groups = n_rep - removed
        else:  # one query head per kv head: drop whole heads
            kv = attn.k_proj.weight.float().view(n_kv, d, -1).pow(2).sum((1, 2)) \
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
