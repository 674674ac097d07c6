"""GGUF block quantization: llama.cpp's ggml weight types, fitted, encoded and decoded in torch.

llama.cpp (ggml-org/llama.cpp, ggml/src/ggml-common.h and ggml-quants.c) stores a quantized weight
matrix row by row in fixed-size *blocks*: every run of 32 weights (the legacy types) or 256 weights (the
K-quants, "super-blocks") along a row is one C struct of fp16 scale(s) and packed integer codes. A weight
decodes as ``scale * level(code)``, plus an offset in the types that store a min; in the K-quants the
scale and min of each 16- or 32-weight sub-block are small integers times the super-block's fp16 d / dmin.

Layouts (bytes per block; d, dmin, m fp16; q a weight's code; fields in this order):
  Q8_0    34 B / 32:  d | int8 q[32]                                   w = d*q
  Q5_1    24 B / 32:  d | m | qh (bit 4 of q[j] at bit j, 32 bits LE) | qs[16]    w = d*q + m      q 0..31
  Q5_0    22 B / 32:  d | qh | qs[16]                                  w = d*(q-16)                  q 0..31
  Q4_1    20 B / 32:  d | m | qs[16] (byte j: q[j] | q[j+16] << 4)     w = d*q + m                   q 0..15
  Q4_0    18 B / 32:  d | qs[16]                                       w = d*(q-8)                   q 0..15
  IQ4_NL  18 B / 32:  d | qs[16]                                       w = d*K[q], K a fixed table of 16 int8
  Q6_K   210 B / 256: ql[128] (low 4 bits) | qh[64] (high 2 bits) | int8 sc[16] | d
                      w = (d*sc)*(q-32), q 0..63, one sc per 16 weights
  Q5_K   176 B / 256: d | dmin | 12 B: eight 6-bit sc, eight 6-bit mn | qh[32] (bit 4) | qs[128]
                      w = (d*sc)*q - dmin*mn, q 0..31, one (sc, mn) per 32 weights
  Q4_K   144 B / 256: d | dmin | 12 B sc/mn | qs[128]                  w = (d*sc)*q - dmin*mn, q 0..15
  Q3_K   110 B / 256: hmask[32] (bit 2 of q) | qs[64] (bits 0-1) | 12 B: sixteen 6-bit sc+32 | d
                      w = (d*sc)*(q-4), q 0..7, sc -32..31, one per 16 weights
  Q2_K    84 B / 256: sc[16] (4-bit sc | 4-bit mn << 4) | qs[64] | d | dmin
                      w = (d*sc)*q - dmin*mn, q 0..3, one (sc, mn) per 16 weights
In the K-quants the codes of a 256-block are interleaved in 32-weight runs (see the packing helpers).

``fit`` minimises sum_ij imp_j * (w_ij - value_ij)^2 over the stored parameters, with imp the per input
column importance (llama.cpp's imatrix: mean squared activation; None = all ones, i.e. plain squared error).
llama.cpp also multiplies the imatrix by sqrt(sigma2 + x^2) and, without one, weighs weights by |x|-like
terms; we minimise the stated objective exactly instead. The search, vectorised over all (sub-)blocks:
  1. each (sub-)block's continuous scale (and offset) by least squares over candidate inverse scales that
     map the extreme weight to either end of the level range (IQ4_NL: of its table), the idea of
     llama.cpp's make_qx/make_qkx searches, then two Lloyd steps (re-round, refit); the legacy types and
     IQ4_NL store that scale (and offset) in fp16 directly;
  2. K-quants: the fp16 super-block d (and dmin) from a fine search over candidates, scoring how well the
     integer multiples round(s/d) approximate the sub-block scales, each weighed by its sensitivity;
  3. K-quants: every sub-block's integer scale and min re-chosen among round(s/d) and its neighbours by
     the true error with the codes re-rounded under those final quantized values; then d and dmin refitted
     by least squares given the codes, and step 3 repeated, kept per super-block where it lowers the error.
  Without an importance the legacy types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 follow llama.cpp's reference rule
  (quantize_row_*_ref) exactly instead, so their bytes equal gguf-py's and llama.cpp's quantizers': d =
  amax/127 (Q8_0), the signed largest weight / -8 or -16 (Q4_0, Q5_0), (max-min)/15 or /31 with m = min
  (Q4_1, Q5_1), and codes rounded with the float32 1/d from before d's fp16 rounding.
Codes (``quantize_columns``) are the nearest stored value under the fitted grid (or that reference
rounding, for a grid the reference rule made: see Grid.reference).

The layouts were written from the format's definition and are checked against gguf-py's dequantizers
(tests/test_ggml.py): ``values`` and ``dequantize`` equal ``gguf.quants.dequantize`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import gguf
import numpy as np
import torch

from compactmind.errors import ConfigError


@dataclass(frozen=True)
class BlockType:
    """One ggml block type: how many weights a block holds and how many bytes it takes."""

    name: str
    block: int  # weights per block along a row
    nbytes: int  # bytes per block
    sub: int  # weights sharing one scale
    ggml: gguf.GGMLQuantizationType

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.block


def _block_type(name: str, sub: int) -> BlockType:
    qtype = gguf.GGMLQuantizationType[name]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    return BlockType(name, block, nbytes, sub, qtype)


TYPES: dict[str, BlockType] = {t.name: t for t in (
    _block_type("Q8_0", 32), _block_type("Q6_K", 16), _block_type("Q5_1", 32), _block_type("Q5_K", 32),
    _block_type("Q5_0", 32), _block_type("Q4_1", 32), _block_type("Q4_K", 32), _block_type("Q4_0", 32),
    _block_type("IQ4_NL", 32), _block_type("Q3_K", 16), _block_type("Q2_K", 16))}

_IQ4NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class _Spec:
    lo: int  # smallest stored code
    hi: int  # largest stored code
    zero: int  # level = code - zero (uniform types)
    asym: bool  # stores a per-(sub-)block offset (a min)
    sub_lo: int = 0  # range of the integer sub-block scales and mins of the K-quants; 0, 0 for legacy
    sub_hi: int = 0
    table: bool = False  # levels are _IQ4NL_LEVELS[code]

    @property
    def kquant(self) -> bool:
        return self.sub_hi > 0


_SPECS = {
    "Q8_0": _Spec(-128, 127, 0, False), "Q5_1": _Spec(0, 31, 0, True), "Q5_0": _Spec(0, 31, 16, False),
    "Q4_1": _Spec(0, 15, 0, True), "Q4_0": _Spec(0, 15, 8, False), "IQ4_NL": _Spec(0, 15, 0, False, table=True),
    "Q6_K": _Spec(0, 63, 32, False, -128, 127), "Q5_K": _Spec(0, 31, 0, True, 0, 63),
    "Q4_K": _Spec(0, 15, 0, True, 0, 63), "Q3_K": _Spec(0, 7, 4, False, -32, 31),
    "Q2_K": _Spec(0, 3, 0, True, 0, 15),
}
_REFERENCE_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")

_TABLE = torch.tensor(_IQ4NL_LEVELS, dtype=torch.float32)
# Nearest table index of a level-space value t, looked up by floor(2t): the midpoints between neighbouring
# levels are half-integers or integers, so floor(2t) decides (ties go to the upper level, as in ggml).
_LUT_LO, _LUT_HI = -232, 202
_LUT = (torch.tensor([a + b for a, b in pairwise(_IQ4NL_LEVELS)])[None, :]
        <= torch.arange(_LUT_LO, _LUT_HI + 1)[:, None]).sum(1).float()
_LUT_LEVEL = _TABLE[_LUT.long()]

_CHUNK = 1 << 18  # weights per fitted row chunk: keeps the temporaries in cache


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value; grids compare by identity
class Grid:
    """The stored per-block parameters of a tensor in one type, already rounded to their storage precision
    (fp16 d/dmin/m, 6-bit or 4-bit or int8 sub-scales, ...), i.e. exactly what encode() will write.

    fields: "d" fp16 [rows, nblocks]; "m" fp16 (Q4_1, Q5_1); "dmin" fp16 (Q2_K, Q4_K, Q5_K);
    "scales" [rows, nblocks, nsub] (uint8, or int8 signed for Q3_K and Q6_K); "mins" uint8 (Q2_K, Q4_K, Q5_K).
    reference: for a legacy type fitted without importance, the float32 "id" (1/d before fp16 rounding) and
    "min" with which llama.cpp's reference rule rounds; quantize_columns then follows that rule (it differs
    from the nearest stored value only at near-ties). Empty: codes are the nearest stored value.
    """

    type: str
    rows: int
    cols: int
    fields: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------- checks

def _type(type_name: str) -> BlockType:
    if type_name not in TYPES:
        raise ConfigError(f"Unknown GGUF block type {type_name!r}; choose one of {', '.join(TYPES)}.")
    return TYPES[type_name]


def bytes_of(type_name: str, numel: int) -> int:
    """Exact stored bytes of numel weights in the type (numel a multiple of its block)."""
    t = _type(type_name)
    if numel % t.block:
        raise ConfigError(f"{t.name} stores weights in blocks of {t.block}, and {numel} weights are not a "
                          f"multiple of {t.block}.")
    return numel // t.block * t.nbytes


def refusal(type_name: str, shape: tuple[int, ...]) -> str | None:
    """One sentence why a tensor of this shape cannot be stored in the type, else None."""
    t = _type(type_name)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 2:
        return f"{t.name} stores 2-D weight matrices [rows, cols], and this tensor has shape {shape}."
    if shape[0] == 0 or shape[1] == 0:
        return f"{t.name} cannot store an empty tensor of shape {shape}."
    if shape[1] % t.block:
        return (f"{t.name} packs each row in blocks of {t.block} weights, and a row of {shape[1]} weights "
                f"is not a multiple of {t.block}.")
    return None


def _matrix(w: torch.Tensor, t: BlockType) -> torch.Tensor:
    reason = refusal(t.name, tuple(w.shape))
    if reason:
        raise ConfigError(reason)
    x = w.detach().to(torch.float32).contiguous()
    if not torch.isfinite(x).all():
        raise ConfigError(f"The weights to store in {t.name} contain NaN or infinite values.")
    return x


def _importance(importance: torch.Tensor | None, cols: int) -> torch.Tensor | None:
    if importance is None:
        return None
    imp = importance.detach().to(torch.float32).reshape(-1)
    if imp.numel() != cols:
        raise ConfigError(f"The importance has {imp.numel()} values but the tensor has {cols} input columns.")
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise ConfigError("The importance must be finite and non-negative in every column.")
    mean = float(imp.mean())
    # A small floor keeps every block's least-squares fit defined where whole blocks have zero importance.
    return imp + 1e-6 * mean if mean > 0 else torch.ones_like(imp)


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK // cols)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


# ----------------------------------------------------------------------------- levels and rounding

def _safe_inv(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.zeros_like(s), 1.0 / s)


def _lut_slot(t: torch.Tensor) -> torch.Tensor:
    return (torch.floor(2 * t).clamp_(_LUT_LO, _LUT_HI) - _LUT_LO).long()


def _nearest_code(t: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """The code whose level is nearest to t (in level space), as float."""
    if spec.table:
        return _LUT[_lut_slot(t)]
    return (torch.round(t) + spec.zero).clamp(spec.lo, spec.hi)


def _level(codes: torch.Tensor, spec: _Spec) -> torch.Tensor:
    if spec.table:
        return _TABLE[codes.long()]
    return (codes - spec.zero).to(torch.float32)


def _nearest_level(t: torch.Tensor, spec: _Spec) -> torch.Tensor:
    if spec.table:
        return _LUT_LEVEL[_lut_slot(t)]
    return torch.round(t).clamp(spec.lo - spec.zero, spec.hi - spec.zero)


def _decode(scale: torch.Tensor, bias: torch.Tensor | None, codes: torch.Tensor, spec: _Spec) -> torch.Tensor:
    v = scale * _level(codes, spec)
    return v if bias is None else v + bias


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim (the first one, as ggml picks it)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _round_away(t: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exactly: a - floor(a) is exact in float32."""
    a = t.abs()
    f = torch.floor(a)
    return torch.sign(t) * (f + (a - f >= 0.5).to(t.dtype))


# ----------------------------------------------------------------------------- step 1: (sub-)block fits

def _deltas(spec: _Spec) -> list[float]:
    levels = spec.hi - spec.lo + 1
    if spec.table:
        return [float(k) for k in range(-8, 9)]
    n = 19 if levels <= 16 else 9 if levels <= 64 else 3
    return torch.linspace(-0.9, 0.9, n).tolist()


def _ls_scale(wx: torch.Tensor, w: torch.Tensor, lev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale of x ~ s*lev and its gain (the error it removes: sum w x^2 - error)."""
    sxl = (wx * lev).sum(-1)
    sll = (w * lev * lev).sum(-1)
    ok = sll > 0
    s = torch.where(ok, sxl / torch.where(ok, sll, 1), 0)
    return s, s * sxl


def _scale_fit(x: torch.Tensor, w: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Per row of x [N, S]: the scale s minimising sum w (x - s*level)^2 over the type's levels."""
    inv_m = _safe_inv(_signed_absmax(x))
    wx = w * x
    best_s = torch.zeros(x.shape[0])
    best_g = torch.zeros(x.shape[0])
    ends = (_IQ4NL_LEVELS[0], _IQ4NL_LEVELS[-1]) if spec.table else (spec.lo - spec.zero, spec.hi - spec.zero)
    targets = [end + d for end in ends for d in _deltas(spec)]
    for k in range(len(targets) + 2):
        if k < len(targets):  # map the largest-magnitude weight to (near) one end of the range
            t = x * (targets[k] * inv_m)[:, None]
        else:  # Lloyd step: re-round under the best scale so far, refit
            t = x * _safe_inv(best_s)[:, None]
        s, g = _ls_scale(wx, w, _nearest_level(t, spec))
        keep = g > best_g
        best_s, best_g = torch.where(keep, s, best_s), torch.where(keep, g, best_g)
    return best_s


def _ls_affine(x: torch.Tensor, w: torch.Tensor, lev: torch.Tensor, sw: torch.Tensor, swx: torch.Tensor,
               nonpos: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares (s, b) of x ~ s*lev + b (b <= 0 if nonpos) and its weighted squared error."""
    wl = w * lev
    sl, sll, sxl = wl.sum(-1), (wl * lev).sum(-1), (wl * x).sum(-1)
    det = sw * sll - sl * sl
    ok = det > 0
    det = torch.where(ok, det, 1)
    s = torch.where(ok, (sw * sxl - swx * sl) / det, 0)
    b = torch.where(ok, (sll * swx - sl * sxl) / det, swx / sw)
    if nonpos:
        clip = b > 0
        s = torch.where(clip, torch.where(sll > 0, sxl / torch.where(sll > 0, sll, 1), 0), s)
        b = torch.where(clip, 0, b)
    err = (w * (s[:, None] * lev + b[:, None] - x) ** 2).sum(-1)
    return s, b, err


def _affine_fit(x: torch.Tensor, w: torch.Tensor, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [N, S]: (s, b) minimising sum w (x - s*q - b)^2, q in 0..hi (b <= 0 for the K-quants)."""
    nonpos, nmax = spec.kquant, spec.hi
    mn, mx = x.min(-1).values, x.max(-1).values
    if nonpos:
        mn = mn.clamp(max=0)
    inv_r = _safe_inv(mx - mn)
    sw, swx = w.sum(-1), (w * x).sum(-1)
    best_s = torch.zeros(x.shape[0])
    best_b = swx / sw
    if nonpos:
        best_b = best_b.clamp(max=0)
    best_e = (w * (x - best_b[:, None]) ** 2).sum(-1)
    deltas = [-1.0 + 0.1 * k for k in range(21)]
    for k in range(len(deltas) + 2):
        if k < len(deltas):  # map the range [min, max] onto 0..nmax+delta
            t = (x - mn[:, None]) * ((nmax + deltas[k]) * inv_r)[:, None]
        else:  # Lloyd step
            t = (x - best_b[:, None]) * _safe_inv(best_s)[:, None]
        s, b, e = _ls_affine(x, w, torch.round(t).clamp(0, nmax), sw, swx, nonpos)
        keep = e < best_e
        best_s, best_b, best_e = (torch.where(keep, s, best_s), torch.where(keep, b, best_b),
                                  torch.where(keep, e, best_e))
    return best_s, best_b


# ----------------------------------------------------------------------------- steps 2-3: K-quant scales

def _super_scale(s: torch.Tensor, sens: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """fp16 d per super-block (s [..., nsub]) whose integer multiples d*clamp(round(s/d), lo, hi) best
    approximate the sub-block scales s, each weighed by its sensitivity sens."""
    m = _signed_absmax(s)
    ends = [hi + 0.49] + ([lo - 0.49] if lo < 0 else [])
    targets = [end * f for end in ends for f in torch.linspace(1.0, 0.6, 64).tolist()]

    def proxy(d16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = d16.float()[..., None]
        q = torch.round(s * _safe_inv(d)).clamp(lo, hi)
        return (sens * (s - d * q) ** 2).sum(-1), q

    best_d = torch.zeros_like(m, dtype=torch.float16)
    best_e, _ = proxy(best_d)
    for t in targets:
        d16 = (m / t).half()
        e, _ = proxy(d16)
        keep = e < best_e
        best_d, best_e = torch.where(keep, d16, best_d), torch.where(keep, e, best_e)
    _, q = proxy(best_d)  # least-squares polish given the integer multiples
    den = (sens * q * q).sum(-1)
    d16 = torch.where(den > 0, (sens * s * q).sum(-1) / torch.where(den > 0, den, 1), 0).half()
    e, _ = proxy(d16)
    return torch.where(e < best_e, d16, best_d)


def _sub_error(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               spec: _Spec) -> torch.Tensor:
    """Weighted squared error of each sub-block (x [..., S]) with codes re-rounded under (scale, bias)."""
    sc, xb = scale[..., None], x
    if bias is not None:
        xb = x - bias[..., None]
    v = sc * _nearest_level(xb * _safe_inv(sc), spec)
    if bias is not None:
        v = v + bias[..., None]
    return (w * (x - v) ** 2).sum(-1)


def _effective_sub(d: torch.Tensor, dmin: torch.Tensor | None, sc: torch.Tensor,
                   mn: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoder's float32 sub-block scale d*sc and offset -(dmin*mn)."""
    scale = d.float()[..., None] * sc
    return scale, (None if dmin is None else -(dmin.float()[..., None] * mn))


def _pick_subscales(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor | None,
                    s: torch.Tensor, b: torch.Tensor | None, spec: _Spec) -> list:
    """Each sub-block's integer scale (and min) among round(s/d) and neighbours, by the true error."""
    sc0 = torch.round(s * _safe_inv(d.float()[..., None]))
    m0 = None if dmin is None else torch.round(-b * _safe_inv(dmin.float()[..., None]))
    steps = [(i, j) for i in (-1, 0, 1) for j in ((-1, 0, 1) if dmin is not None else (0,))]
    best = None
    for i, j in steps:
        sc = (sc0 + i).clamp(spec.sub_lo, spec.sub_hi)
        mn = None if m0 is None else (m0 + j).clamp(0, spec.sub_hi)
        e = _sub_error(x, w, *_effective_sub(d, dmin, sc, mn), spec)
        if best is None:
            best = [sc, mn, e]
            continue
        keep = e < best[2]
        best = [torch.where(keep, sc, best[0]), None if mn is None else torch.where(keep, mn, best[1]),
                torch.where(keep, e, best[2])]
    return best


def _refit_super(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor | None,
                 sc: torch.Tensor, mn: torch.Tensor | None, spec: _Spec
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares d (and dmin) of each super-block given its sub-scales, mins and codes, in fp16."""
    scale, bias = _effective_sub(d, dmin, sc, mn)
    xb = x if bias is None else x - bias[..., None]
    a = sc[..., None] * _nearest_level(xb * _safe_inv(scale[..., None]), spec)
    dims = (-2, -1)
    saa, sax = (w * a * a).sum(dims), (w * a * x).sum(dims)
    d_ls = torch.where(saa > 0, sax / torch.where(saa > 0, saa, 1), d.float())
    if dmin is None:
        return d_ls.half(), None
    c = -mn[..., None].expand_as(a)
    scc, sac, scx = (w * c * c).sum(dims), (w * a * c).sum(dims), (w * c * x).sum(dims)
    det = saa * scc - sac * sac
    ok = det > 1e-12 * saa * scc
    det = torch.where(ok, det, 1)
    d2 = torch.where(ok, (scc * sax - sac * scx) / det, d_ls)
    m2 = torch.where(ok, (saa * scx - sac * sax) / det, dmin.float())
    return d2.half(), m2.half()


def _fit_kquant(x: torch.Tensor, w: torch.Tensor, t: BlockType, spec: _Spec) -> dict[str, torch.Tensor]:
    rows, nsub = x.shape[0], t.block // t.sub
    shape = (rows, x.shape[1] // t.block, nsub)
    xs, ws = x.reshape(-1, t.sub), w.reshape(-1, t.sub)
    if spec.asym:
        s, b = _affine_fit(xs, ws, spec)
        lev = torch.round((xs - b[:, None]) * _safe_inv(s)[:, None]).clamp(0, spec.hi)
        d = _super_scale(s.view(shape), (ws * lev * lev).sum(-1).view(shape), 0, spec.sub_hi)
        dmin = _super_scale(-b.view(shape), ws.sum(-1).view(shape), 0, spec.sub_hi)
        b = b.view(shape)
    else:
        s = _scale_fit(xs, ws, spec)
        lev = _nearest_level(xs * _safe_inv(s)[:, None], spec)
        d = _super_scale(s.view(shape), (ws * lev * lev).sum(-1).view(shape), spec.sub_lo, spec.sub_hi)
        dmin, b = None, None
    s = s.view(shape)
    xk, wk = x.view(*shape, t.sub), w.reshape(*shape, t.sub)
    sc, mn, err = _pick_subscales(xk, wk, d, dmin, s, b, spec)
    for _ in range(2):
        d2, dmin2 = _refit_super(xk, wk, d, dmin, sc, mn, spec)
        sc2, mn2, err2 = _pick_subscales(xk, wk, d2, dmin2, s, b, spec)
        keep = err2.sum(-1) < err.sum(-1)  # per super-block
        d, sc = torch.where(keep, d2, d), torch.where(keep[..., None], sc2, sc)
        err = torch.where(keep[..., None], err2, err)
        if dmin is not None:
            dmin, mn = torch.where(keep, dmin2, dmin), torch.where(keep[..., None], mn2, mn)
    sdtype = torch.int8 if spec.sub_lo < 0 else torch.uint8
    fields = {"d": d, "scales": sc.to(sdtype)}
    if dmin is not None:
        fields.update(dmin=dmin, mins=mn.to(torch.uint8))
    return fields


# ----------------------------------------------------------------------------- legacy fits

def _fit_legacy(x: torch.Tensor, w: torch.Tensor, t: BlockType, spec: _Spec) -> dict[str, torch.Tensor]:
    rows = x.shape[0]
    xb, wb = x.reshape(-1, t.block), w.reshape(-1, t.block)
    if spec.asym:
        s, b = _affine_fit(xb, wb, spec)
        return {"d": s.half().view(rows, -1), "m": b.half().view(rows, -1)}
    return {"d": _scale_fit(xb, wb, spec).half().view(rows, -1)}


def _fit_reference(x: torch.Tensor, t: BlockType, spec: _Spec) -> tuple[dict, dict]:
    """llama.cpp's quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1}_ref, exactly (float32 as in C)."""
    rows = x.shape[0]
    xb = x.view(rows, -1, t.block)
    if t.name == "Q8_0":
        d = xb.abs().amax(-1) / 127
    elif spec.asym:
        mn = xb.amin(-1)
        d = (xb.amax(-1) - mn) / spec.hi
    else:
        d = _signed_absmax(xb) / -spec.zero
    ref = {"id": _safe_inv(d)}
    fields = {"d": d.half()}
    if spec.asym:
        fields["m"], ref["min"] = mn.half(), mn
    return fields, ref


def _reference_codes(name: str, x: torch.Tensor, inv: torch.Tensor, mn: torch.Tensor | None) -> torch.Tensor:
    """The reference rule's codes of x given its float32 1/d (and min), per weight."""
    spec = _SPECS[name]
    if name == "Q8_0":
        return _round_away(x * inv).clamp(spec.lo, spec.hi)
    if spec.asym:
        return torch.trunc((x - mn) * inv + 0.5).clamp(spec.lo, spec.hi)
    return torch.trunc(x * inv + (spec.zero + 0.5)).clamp(spec.lo, spec.hi)


# ----------------------------------------------------------------------------- public fitting API

def fit(w: torch.Tensor, type_name: str, importance: torch.Tensor | None = None) -> Grid:
    """Every block's stored parameters for weights w [rows, cols], minimising
    sum_ij importance_j * (w_ij - value_ij)^2 including the rounding of all scales (see the module doc)."""
    t = _type(type_name)
    spec = _SPECS[t.name]
    x = _matrix(w, t)
    rows, cols = x.shape
    imp = _importance(importance, cols)
    if imp is None and t.name in _REFERENCE_TYPES:
        fields, ref = _fit_reference(x, t, spec)
        return Grid(t.name, rows, cols, fields, ref)
    parts = []
    for r0, r1 in _row_chunks(rows, cols):
        xc = x[r0:r1]
        wc = torch.ones_like(xc) if imp is None else imp.expand_as(xc).contiguous()
        parts.append((_fit_kquant if spec.kquant else _fit_legacy)(xc, wc, t, spec))
    fields = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return Grid(t.name, rows, cols, fields)


def _effective(grid: Grid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per sub-block float32 scale and offset [rows, cols // sub], computed as ggml's decoder does."""
    f = grid.fields
    if "scales" not in f:
        return f["d"].float(), (f["m"].float() if "m" in f else None)
    scale, bias = _effective_sub(f["d"], f.get("dmin"), f["scales"].float(),
                                 f["mins"].float() if "mins" in f else None)
    return scale.reshape(grid.rows, -1), (None if bias is None else bias.reshape(grid.rows, -1))


def _nearest_codes(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, spec: _Spec) -> torch.Tensor:
    """The code of the stored value nearest to x, checking the rounded code's neighbours in value space."""
    xb = x if bias is None else x - bias
    best = _nearest_code(xb * _safe_inv(scale), spec)
    err = (x - _decode(scale, bias, best, spec)).abs()
    for step in (-1.0, 1.0):
        cand = (best + step).clamp(spec.lo, spec.hi)
        e = (x - _decode(scale, bias, cand, spec)).abs()
        better = e < err
        best, err = torch.where(better, cand, best), torch.where(better, e, err)
    return best


def quantize_columns(grid: Grid, w_cols: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int16 [rows, k]) and their float32 values for the columns start..start+k of the tensor under
    the fixed grid: the nearest stored value (or the reference rule, see Grid.reference)."""
    t, spec = TYPES[grid.type], _SPECS[grid.type]
    x = w_cols.detach().to(torch.float32)
    if x.dim() != 2 or x.shape[0] != grid.rows or start < 0 or start + x.shape[1] > grid.cols:
        raise ValueError(f"quantize_columns takes [{grid.rows}, k] columns within 0..{grid.cols}, "
                         f"got shape {tuple(x.shape)} at column {start}.")
    cols = torch.arange(start, start + x.shape[1])
    subs, blocks = cols // t.sub, cols // t.block
    scale, bias = _effective(grid)
    ref = grid.reference
    codes, vals = [], []
    for r0, r1 in _row_chunks(grid.rows, max(1, x.shape[1])):
        s = scale[r0:r1][:, subs]
        b = None if bias is None else bias[r0:r1][:, subs]
        if ref:
            mn = ref["min"][r0:r1][:, blocks] if "min" in ref else None
            c = _reference_codes(grid.type, x[r0:r1], ref["id"][r0:r1][:, blocks], mn)
        else:
            c = _nearest_codes(x[r0:r1], s, b, spec)
        codes.append(c.to(torch.int16))
        vals.append(_decode(s, b, c, spec))
    return torch.cat(codes), torch.cat(vals)


def values(grid: Grid, codes: torch.Tensor) -> torch.Tensor:
    """float32 [rows, cols]: what gguf.quants.dequantize(encode(grid, codes), type) returns, bit for bit."""
    t, spec = TYPES[grid.type], _SPECS[grid.type]
    scale, bias = _effective(grid)
    v = scale[..., None] * _level(codes, spec).view(grid.rows, -1, t.sub)
    if bias is not None:
        v = v + bias[..., None]
    return v.reshape(grid.rows, grid.cols)


def quantize(w: torch.Tensor, type_name: str, importance: torch.Tensor | None = None
             ) -> tuple[np.ndarray, torch.Tensor]:
    """fit + quantize_columns over all columns + encode: (the tensor's bytes, their float32 values)."""
    grid = fit(w, type_name, importance)
    codes, vals = quantize_columns(grid, w, 0)
    return encode(grid, codes), vals


# ----------------------------------------------------------------------------- byte packing

def _h(x: torch.Tensor) -> np.ndarray:
    """fp16 [..] -> its little-endian bytes [.., 2]."""
    return x.to(torch.float16).numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _unh(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view("<f2").astype(np.float16)[..., 0])


def _nibbles(c: np.ndarray) -> np.ndarray:  # [.., 32] -> [.., 16]: byte j = c[j] | c[j+16] << 4
    return c[..., :16] | (c[..., 16:] << 4)


def _unnibbles(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b & 15, b >> 4], axis=-1)


def _crumbs(c: np.ndarray) -> np.ndarray:
    """2-bit fields [.., 256] -> [.., 64]: weight 128n + 32s + l at bits 2s of byte 32n + l."""
    c = c.reshape(*c.shape[:-1], 2, 4, 32)
    return (c[..., 0, :] | c[..., 1, :] << 2 | c[..., 2, :] << 4 | c[..., 3, :] << 6).reshape(*c.shape[:-3], 64)


def _uncrumbs(b: np.ndarray) -> np.ndarray:
    b = b.reshape(*b.shape[:-1], 2, 1, 32)
    return ((b >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3).reshape(*b.shape[:-3], 256)


def _bitplanes(bits: np.ndarray) -> np.ndarray:
    """1-bit fields [.., 256] -> [.., 32]: weight j at bit j // 32 of byte j % 32."""
    bits = bits.reshape(*bits.shape[:-1], 8, 32)
    out = np.zeros(bits.shape[:-2] + (32,), np.uint8)
    for k in range(8):
        out |= bits[..., k, :] << k
    return out


def _unbitplanes(b: np.ndarray) -> np.ndarray:
    return ((b[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(*b.shape[:-1], 256)


def _k_nibbles(c: np.ndarray) -> np.ndarray:
    """4-bit fields [.., 256] -> [.., 128]: in each 64-run, byte l = c[l] | c[l+32] << 4."""
    c = c.reshape(*c.shape[:-1], 4, 2, 32)
    return (c[..., 0, :] | c[..., 1, :] << 4).reshape(*c.shape[:-3], 128)


def _unk_nibbles(b: np.ndarray) -> np.ndarray:
    b = b.reshape(*b.shape[:-1], 4, 1, 32)
    return np.concatenate([b & 15, b >> 4], axis=-2).reshape(*b.shape[:-3], 256)


def _q6_low(c: np.ndarray) -> np.ndarray:
    """Q6_K's low nibbles [.., 256] -> [.., 128]: in each 128-run, byte 32t + l = c[32t+l] | c[32t+64+l] << 4."""
    c = c.reshape(*c.shape[:-1], 2, 4, 32)
    return (c[..., 0:2, :] | c[..., 2:4, :] << 4).reshape(*c.shape[:-3], 128)


def _unq6_low(b: np.ndarray) -> np.ndarray:
    b = b.reshape(*b.shape[:-1], 2, 2, 32)
    return np.concatenate([b & 15, b >> 4], axis=-2).reshape(*b.shape[:-3], 256)


def _k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> 12 bytes (ggml's get_scale_min_k4 layout)."""
    return np.concatenate([sc[..., :4] | (sc[..., 4:] >> 4) << 6, mn[..., :4] | (mn[..., 4:] >> 4) << 6,
                           (sc[..., 4:] & 15) | (mn[..., 4:] & 15) << 4], axis=-1)


def _unk4_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = b[..., 8:12] & 15, b[..., 8:12] >> 4
    sc = np.concatenate([b[..., 0:4] & 63, lo | (b[..., 0:4] >> 6) << 4], axis=-1)
    mn = np.concatenate([b[..., 4:8] & 63, hi | (b[..., 4:8] >> 6) << 4], axis=-1)
    return sc, mn


def _q3_scales(sc: np.ndarray) -> np.ndarray:
    """Sixteen signed 6-bit scales -> 12 bytes: low nibbles of j and j+8 in byte j, bits 4-5 of scale
    4g + i at bits 2g of byte 8 + i."""
    u = (sc.astype(np.int16) + 32).astype(np.uint8)
    high = (u >> 4).reshape(*u.shape[:-1], 4, 4)
    packed = high[..., 0, :] | high[..., 1, :] << 2 | high[..., 2, :] << 4 | high[..., 3, :] << 6
    return np.concatenate([(u[..., :8] & 15) | (u[..., 8:] & 15) << 4, packed], axis=-1)


def _unq3_scales(b: np.ndarray) -> np.ndarray:
    low = np.concatenate([b[..., :8] & 15, b[..., :8] >> 4], axis=-1)
    high = (b[..., None, 8:12] >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    return (low | high.reshape(*b.shape[:-1], 16) << 4).astype(np.int16) - 32


def _pack(name: str, f: dict[str, np.ndarray], c: np.ndarray) -> list[np.ndarray]:
    """The block's fields in struct order; c: the codes [rows, nblocks, block] as uint8."""
    if name == "Q8_0":
        return [f["d"], c]
    if name in ("Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1"):
        head = [f["d"]] + ([f["m"]] if "m" in f else [])
        if name in ("Q5_0", "Q5_1"):
            head.append(np.packbits((c >> 4) & 1, axis=-1, bitorder="little"))
        return head + [_nibbles(c & 15)]
    if name == "Q2_K":
        return [f["scales"] | f["mins"] << 4, _crumbs(c), f["d"], f["dmin"]]
    if name == "Q3_K":
        return [_bitplanes(c >> 2), _crumbs(c & 3), _q3_scales(f["scales"]), f["d"]]
    if name == "Q4_K":
        return [f["d"], f["dmin"], _k4_scales(f["scales"], f["mins"]), _k_nibbles(c)]
    if name == "Q5_K":
        return [f["d"], f["dmin"], _k4_scales(f["scales"], f["mins"]), _bitplanes(c >> 4), _k_nibbles(c & 15)]
    return [_q6_low(c & 15), _crumbs(c >> 4), f["scales"].view(np.uint8), f["d"]]  # Q6_K


def encode(grid: Grid, codes: torch.Tensor) -> np.ndarray:
    """uint8 [rows, cols // block * nbytes]: the tensor in ggml's block layout, row-major, as
    gguf.GGUFWriter.add_tensor(name, data, raw_dtype=type.ggml) takes pre-quantized data."""
    t, spec = TYPES[grid.type], _SPECS[grid.type]
    if tuple(codes.shape) != (grid.rows, grid.cols):
        raise ValueError(f"encode takes codes of shape {(grid.rows, grid.cols)}, got {tuple(codes.shape)}.")
    c = codes.detach().to(torch.int16)
    if c.numel() and (int(c.min()) < spec.lo or int(c.max()) > spec.hi):
        raise ValueError(f"{t.name} codes lie in {spec.lo}..{spec.hi}.")
    c = c.numpy().astype(np.int8 if spec.lo < 0 else np.uint8).view(np.uint8)
    c = c.reshape(grid.rows, -1, t.block)
    f = {k: (_h(v) if v.dtype == torch.float16 else v.numpy()) for k, v in grid.fields.items()}
    out = np.concatenate(_pack(t.name, f, c), axis=-1)
    assert out.shape[-1] == t.nbytes
    return np.ascontiguousarray(out.reshape(grid.rows, -1))


def _unpack(name: str, b: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Inverse of _pack: the fields and the codes [rows, nblocks, block] of blocks b [rows, nblocks, nbytes]."""
    if name == "Q8_0":
        return {"d": _unh(b[..., :2])}, b[..., 2:].view(np.int8)
    if name in ("Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1"):
        f, at = {"d": _unh(b[..., :2])}, 2
        if name in ("Q4_1", "Q5_1"):
            f["m"], at = _unh(b[..., 2:4]), 4
        c = _unnibbles(b[..., -16:])
        if name in ("Q5_0", "Q5_1"):
            c = c | np.unpackbits(b[..., at:at + 4], axis=-1, bitorder="little") << 4
        return f, c
    if name == "Q2_K":
        return ({"scales": b[..., :16] & 15, "mins": b[..., :16] >> 4, "d": _unh(b[..., 80:82]),
                 "dmin": _unh(b[..., 82:84])}, _uncrumbs(b[..., 16:80]))
    if name == "Q3_K":
        c = _unbitplanes(b[..., :32]) << 2 | _uncrumbs(b[..., 32:96])
        return {"scales": _unq3_scales(b[..., 96:108]).astype(np.int8), "d": _unh(b[..., 108:110])}, c
    if name in ("Q4_K", "Q5_K"):
        sc, mn = _unk4_scales(b[..., 4:16])
        c = _unk_nibbles(b[..., -128:])
        if name == "Q5_K":
            c = c | _unbitplanes(b[..., 16:48]) << 4
        return {"d": _unh(b[..., 0:2]), "dmin": _unh(b[..., 2:4]), "scales": sc, "mins": mn}, c
    c = _unq6_low(b[..., :128]) | _uncrumbs(b[..., 128:192]) << 4  # Q6_K
    return {"scales": b[..., 192:208].view(np.int8), "d": _unh(b[..., 208:210])}, c


def dequantize(data: np.ndarray, type_name: str, cols: int) -> torch.Tensor:
    """Our own decoder of encode()'s bytes -> float32 [rows, cols]; equals gguf.quants.dequantize bit for bit."""
    return values(*decode(data, type_name, cols))


def decode(data: np.ndarray, type_name: str, cols: int) -> tuple[Grid, torch.Tensor]:
    """encode()'s bytes -> (the grid, the codes int16 [rows, cols]): what was encoded, to encode again."""
    t = _type(type_name)
    if cols <= 0 or cols % t.block:
        raise ConfigError(f"{t.name} packs each row in blocks of {t.block} weights, and a row of {cols} "
                          f"weights is not a multiple of {t.block}.")
    row_bytes = cols // t.block * t.nbytes
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size % row_bytes:
        raise ConfigError(f"{raw.size} bytes are not whole rows of {cols} {t.name} weights ({row_bytes} bytes each).")
    rows = raw.size // row_bytes
    fields, codes = _unpack(t.name, raw.reshape(rows, -1, t.nbytes))
    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)))
               for k, v in fields.items()}
    return Grid(t.name, rows, cols, tensors), torch.from_numpy(codes.astype(np.int16)).reshape(rows, cols)


def joined(grids: list[Grid]) -> Grid:
    """One grid from the grids of consecutive column ranges of one tensor (each a whole number of blocks), as
    a solver that fits each block when it reaches it makes them."""
    first = grids[0]
    fields = {k: torch.cat([g.fields[k] for g in grids], 1) for k in first.fields}
    ref = {k: torch.cat([g.reference[k] for g in grids], 1) for k in first.reference} if first.reference else {}
    return Grid(first.type, first.rows, sum(g.cols for g in grids), fields, ref)


# Activations as llama.cpp's CPU kernels see them. ggml's CPU matrix products do not multiply a block-quantized
# weight by float activations: each row of the input is first quantized to the weight type's partner type
# (ggml-cpu's vec_dot_type): Q8_K for the K-quants (blocks of 256, an FP32 scale), Q8_0 / Q8_1 for the 32-weight
# types (an FP16 scale). Both store codes round(x * 127 / max |x|) over the block, ties to even, and the value of a
# code is code * d: Q8_K's d = 1 / (127 / max |x|) in FP32, Q8_0's d = max |x| / 127 rounded to FP16 (its codes
# are computed before that rounding). transformers (and a `gguf` trial with activations="float") evaluates the
# dequantized weights on float activations instead: on SmolLM2 the two differ by ~0.7% in perplexity
# (scripts/ggml_rounding.py). A weight recorded with act_quant="ggml" is evaluated as llama.cpp's CPU backend
# computes it (its GPU backends round differently, to Q8_1 blocks of 32); methods/_gguf.py's hooks apply it.
ACT_QUANT = "ggml"  # the ledger's act_quant of a weight whose inputs are rounded as ggml's CPU kernels round them


def round_activations(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """x with every run of the type's block size along its last dimension rounded as ggml rounds a row of
    activations before a product with a `type_name` weight."""
    block = _type(type_name).block
    v = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = v.abs().amax(-1, keepdim=True)
    nonzero = amax > 0  # an all-zero block stays zero
    # torch's `scalar / tensor` multiplies by a reciprocal; ggml divides: torch.div keeps its float32 results
    inverse = torch.where(nonzero, torch.div(torch.full_like(amax, 127.0), amax), 0.0)
    codes = torch.round(v * inverse)
    d = torch.where(nonzero, torch.div(torch.ones_like(amax), inverse), 0.0) if block == 256 \
        else torch.div(amax, torch.full_like(amax, 127.0)).half().float()
    return (codes * d).reshape(x.shape).to(x.dtype)
