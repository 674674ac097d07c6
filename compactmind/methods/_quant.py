"""Pure tensor functions for quantization (fake quantization: quantize, then dequantize in the input dtype), and
the glue the weight-only quantizers share (their parameters, writing a quantized weight, casts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from compactmind.formats import QuantParams, narrow_to, record
from compactmind.models import block_linears
from compactmind.registry import Kind, Method
from compactmind.space import Categorical


class Quantized(NamedTuple):
    """A fake-quantized weight (float, = scale * (code - zero)) with the scale and zero point of each group of
    input columns, [rows, groups]: what a packed export stores beside the integer codes."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales as stored: FP16 (the size accounting counts 16 bits), never 0."""
    scale = scale.half().float()
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_per_row(w: torch.Tensor, bits: int) -> Quantized:
    """Symmetric per-output-channel round-to-nearest: one scale max|row| / (2^(bits-1) - 1) per row (codes
    stored unsigned, offset by 2^(bits-1))."""
    qmax = 2 ** (bits - 1) - 1
    wf = w.float()
    scale = fp16_scale(wf.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / qmax)
    deq = (wf / scale).round().clamp(-qmax, qmax).mul(scale).to(w.dtype)
    return Quantized(deq, scale, torch.full_like(scale, 2 ** (bits - 1)))


def cast_rest_to_fp16_(model: nn.Module) -> None:
    """Round every weight outside the block linears through FP16 and record it as 16-bit.

    Quantized checkpoints (GPTQ, AWQ, SmoothQuant) keep embeddings, norms and the head in FP16; the search
    simulates that so the accounting and the measured perplexity describe the same model.
    """
    cast_all_(model, torch.float16, skip={id(m.weight) for _, m in block_linears(model)})

# ---- weight-only k-bit quantization (GPTQ's convention: unsigned codes 0..2^k-1 with a zero point) ----------


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` [rows, group], as the GPTQ reference quantizer computes them (FP32;
    symmetric: scale 2·max|w| / (2^k - 1), zero point 2^(k-1), not stored). The range always contains 0, so a
    zero weight (a pruned one) quantizes to exactly 0.

    The codes come from this FP32 scale and the weights are dequantized with its FP16 rounding (what a checkpoint
    stores), as GPTQ checkpoints are made. Codes from the FP16 scale would break ties the other way in half the
    groups, and weights dequantized from a 4-bit GGUF sit on ties often: SmolLM2 RTN W4 g64 symmetric measured
    53.88 that way against the reference's 52.03."""
    maxq = 2 ** bits - 1
    wf = w.float()
    lo = wf.min(dim=1, keepdim=True).values.clamp(max=0)
    hi = wf.max(dim=1, keepdim=True).values.clamp(min=0)
    if symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    exact = (hi - lo) / maxq
    scale = torch.where(exact.half() == 0, torch.ones_like(exact), exact)  # one FP16 cannot hold: 1, as stored
    zero = torch.full_like(scale, 2 ** (bits - 1)) if symmetric else torch.round(-lo / scale)
    return scale, zero


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  stored: torch.Tensor | None = None, nearest_stored: bool = False) -> torch.Tensor:
    """Values from the stored (FP16) scale (`stored`: fp16_scale(scale), passed in by a caller that quantizes many
    columns with one scale); codes from the exact FP32 scale, as the GPTQ reference quantizer rounds (RTN), or
    (nearest_stored) the nearest stored value, what GPTQ's error feedback must see."""
    stored = fp16_scale(scale) if stored is None else stored
    q = torch.clamp(torch.round(w.float() / (stored if nearest_stored else scale)) + zero, 0, 2 ** bits - 1)
    return stored * (q - zero)


def groups_of(cols: int, group_size: int) -> list[tuple[int, int]]:
    """Column ranges of the quantization groups; 0 = one group per row. A last group may be shorter."""
    g = cols if group_size == 0 else group_size
    return [(s, min(s + g, cols)) for s in range(0, cols, g)]


def rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest k-bit quantization per group of input columns (dequantized, float32)."""
    return rtn_quantize(w, bits, group_size, symmetric).weight


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> Quantized:
    out = torch.empty_like(w, dtype=torch.float32)
    params = []
    for s, e in groups_of(w.shape[1], group_size):
        scale, zero = group_params(w[:, s:e], bits, symmetric)
        out[:, s:e] = fake_quantize(w[:, s:e], scale, zero, bits)
        params.append((scale, zero))
    return Quantized(out, fp16_scale(torch.cat([p[0] for p in params], 1)), torch.cat([p[1] for p in params], 1))


def gptq_solve(W: torch.Tensor, H: torch.Tensor, quantize_column, act_order: bool, damp: float = 0.01,
               block: int = 128, keep: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's loop, for any grid: quantize W [rows, cols] column by column (by decreasing H_jj with act_order),
    spreading each column's rounding error over the columns not yet quantized through the Cholesky factor of
    H^-1, in lazy blocks of `block` columns. `quantize_column(j, w, current)` returns the stored values of
    original column j for its current weights w [rows]; `current(cols)` gives the up-to-date weights [rows, k]
    of original columns not quantized yet (for a grid fitted when its group is first reached). keep [rows,
    cols]: where False the weight is 0 (pruned) and stays 0. Returns the quantized weight, original order."""
    from compactmind.methods._sparse import prepare_hessian

    rows, cols = W.shape
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    position = torch.argsort(perm)
    if act_order:  # one copy each, permuted (the caller's H is an accumulator: never changed here)
        W, H = W.float()[:, perm], H[perm.unsqueeze(1), perm.unsqueeze(0)]
        keep = keep[:, perm] if keep is not None else None
    else:
        W = W.float().clone()
    Hinv = prepare_hessian(H, W, damp, inplace=act_order)
    del H
    Q = torch.empty_like(W)  # in the original column order
    order = perm.tolist()  # Python ints: no tensor-to-int conversion per column
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        # the block's columns as contiguous rows (transposed): each column's update is one contiguous sweep
        W1, Err1, Hinv1 = W[:, i1:i2].T.contiguous(), torch.zeros(i2 - i1, rows), Hinv[i1:i2, i1:i2]
        Q1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            def current(original: torch.Tensor, i=i) -> torch.Tensor:
                p = position[original]
                inside, later = p[p < i2] - i1, p[p >= i2]
                out = torch.empty(rows, len(p))
                out[:, p < i2] = W1[inside].T
                out[:, p >= i2] = W[:, later] - Err1[:i].T @ Hinv[i1:i1 + i, later]
                return out

            q = quantize_column(order[i1 + i], W1[i], current)
            if keep is not None:
                q = q * keep[:, i1 + i]
            Q1[i] = q
            err = (W1[i] - q) / Hinv1[i, i]
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Err1[i] = err
        Q[:, perm[i1:i2]] = Q1.T
        W[:, i2:] -= Err1.T @ Hinv[i1:i2, i2:]
    return Q


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool, act_order: bool,
         damp: float = 0.01, block: int = 128, keep_zeros: bool = False, static_groups: bool = False) -> Quantized:
    """GPTQ onto k-bit integer groups of contiguous input columns (the layout RTN stores). A group's scale and
    zero point are chosen when the loop first reaches one of its columns, from the weights as the error feedback
    has made them by then (the reference implementation's default, "dynamic groups"), or (static_groups) from
    the original weights before the loop. Each weight takes the nearest value the stored (FP16) scale gives,
    so the error fed back is the error the checkpoint has. keep_zeros: weights that are 0 (pruned) stay 0."""
    rows, cols = W.shape
    spans = groups_of(cols, group_size)
    group_of = [g for g, (s, e) in enumerate(spans) for _ in range(s, e)]
    params: dict[int, tuple] = {}  # group -> (scale, zero, the stored scale)

    def fitted(w: torch.Tensor) -> tuple:
        scale, zero = group_params(w, bits, symmetric)
        return scale, zero, fp16_scale(scale)

    if static_groups:
        params = {g: fitted(W[:, s:e].float()) for g, (s, e) in enumerate(spans)}

    def quantize_column(j: int, w: torch.Tensor, current) -> torch.Tensor:
        g = group_of[j]
        if g not in params:
            s, e = spans[g]
            params[g] = fitted(current(torch.arange(s, e)))
        scale, zero, stored = params[g]
        return fake_quantize(w.unsqueeze(1), scale, zero, bits, stored, nearest_stored=True).squeeze(1)

    keep = (W != 0) if keep_zeros else None
    Q = gptq_solve(W, H, quantize_column, act_order, damp, block, keep)
    scale = torch.cat([params[g][0] for g in range(len(spans))], 1)
    zero = torch.cat([params[g][1] for g in range(len(spans))], 1)
    return Quantized(Q, fp16_scale(scale), zero)


# ---- glue shared by the weight-only quantizers ------------------------------------------------------------


def check_quant(bits: int, group_size: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    if group_size < 0:
        raise ValueError(f"group_size must be 0 (one group per row) or positive, got {group_size}")


class WeightQuantizer(Method):
    """Base of the k-bit weight-only quantizers: `bits`, `group_size` (input columns per scale; 0: one scale per
    output row) and `symmetric` (zero point fixed at 2^(k-1), or a stored k-bit zero point per group)."""

    kind = Kind.QUANTIZATION

    @dataclass(frozen=True)
    class Params:
        bits: int = 4
        group_size: int = 128
        symmetric: bool = False

        def __post_init__(self):
            check_quant(self.bits, self.group_size)

    space = {"bits": Categorical([2, 3, 4, 8]), "group_size": Categorical([128, 0]), "symmetric": Categorical([False])}


def write_quantized_(linear: nn.Linear, q: Quantized, bits: int, group_size: int | None, symmetric: bool) -> None:
    """Store a dequantized weight and record its packed format: codes, FP16 scales and zero points per group."""
    linear.weight.copy_(q.weight.to(linear.weight.dtype))
    record(linear, "weight", bits=bits, scaled=True, group_size=group_size or None, zero_point=not symmetric,
           qparams=QuantParams(q.scale.half(), q.zero.to(torch.uint8)))


@torch.no_grad()
def cast_all_(model: nn.Module, dtype: torch.dtype, skip: set[int] = frozenset()) -> None:
    """Round every weight (but those in `skip`, by id) through `dtype` and record the cast."""
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in skip:
                continue
            if id(p) not in seen:
                seen.add(id(p))
                p.data.copy_(p.data.to(dtype).to(p.dtype))
            narrow_to(module, name, dtype)
