"""Calibration samples handed to methods, and a cache of statistics measured on the dense model.

Statistics of the dense model (for example SmoothQuant's activation maxima) do not depend on the trial, so a
method that runs as the first step of a pipeline asks the cache, and the first trial that needs them pays once
per study. A method that runs after another step sees a changed model and measures afresh.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compactmind import interrupt
from compactmind.errors import CalibrationError


@dataclass
class Calibration:
    samples: torch.Tensor  # [n, seq_len] token ids
    model_is_dense: bool = True  # set by the pipeline executor before each step
    step: str = ""  # the step being applied, for progress reports (set by the pipeline executor)
    on_block: Callable[[str, int, int], None] | None = None  # (step, blocks done, blocks) in the calibration loop
    _dense_cache: dict[str, Any] = field(default_factory=dict)

    def stats(self, key: str, compute: Callable[[], Any]) -> Any:
        """Return `compute()`, cached per study when the model is still the dense one."""
        if not self.model_is_dense:
            return compute()
        if key not in self._dense_cache:
            self._dense_cache[key] = compute()
        return self._dense_cache[key]


def require(calib: Calibration | None, method: str) -> Calibration:
    if calib is None or calib.samples.numel() == 0:
        raise CalibrationError(f"{method} needs calibration samples; pass --data_samples of at least 1.")
    return calib


@torch.inference_mode()
def run_body(model: nn.Module, samples: torch.Tensor) -> None:
    """Forward every calibration sample through the transformer blocks (the head is not needed)."""
    device = next(model.parameters()).device
    body = getattr(model, "model", None)
    for row in samples:
        ids = row.unsqueeze(0).to(device)
        if body is not None and hasattr(body, "layers"):
            body(input_ids=ids, use_cache=False)
        else:
            model(input_ids=ids, use_cache=False)


def output_absmax(model: nn.Module, samples: torch.Tensor, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per-channel max |output| of each named module over all calibration tokens (float32, on the CPU)."""
    maxima: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_module, _args, output):
            x = output.detach().abs().reshape(-1, output.shape[-1]).amax(0).float()
            maxima[name] = x if name not in maxima else torch.maximum(maxima[name], x)
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    try:
        run_body(model, samples)
    finally:
        for h in handles:
            h.remove()
    return {n: v.cpu() for n, v in maxima.items()}


# ---- the layer-by-layer calibration loop, written once ---------------------------------------------------


class _Stop(Exception):
    pass


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, samples: torch.Tensor, layers: nn.ModuleList):
    """Run each sample up to the first block and keep its hidden states and call arguments."""
    device = next(model.parameters()).device
    inputs: list[torch.Tensor] = []
    call_kwargs: list[dict] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden)
        call_kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    body = getattr(model, "model", model)
    try:
        for row in samples:
            try:
                body(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, call_kwargs


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def sequential_(model: nn.Module, calib: Calibration, collect: Callable[[str, nn.Linear], Any],
                solve_block: Callable[[int, nn.Module, dict[str, Any], list], None],
                true_sequential: bool = False) -> None:
    """The GPTQ/SparseGPT/Wanda/AWQ calibration loop: block by block, each block seeing its predecessors' outputs.

    For block i: every linear gets a forward hook feeding `collect(name, linear)`'s accumulator (its
    `add_batch(inp, out)`; linears reading one input tensor, q/k/v and gate/up, share one), the calibration
    samples run through the block, `solve_block(i, block, stats, samples)` compresses it (`samples`: the
    block's (input, call arguments) per calibration sample), and the samples run through it again so block i+1
    sees its outputs. true_sequential (GPTQ's option): the block's linears are compressed in stages, the
    linears reading one input together (q/k/v, then o, then gate/up, then down), each stage's statistics taken
    with the earlier stages already compressed. Only the current block's statistics exist at any time.
    """
    from compactmind.models import decoder_layers, onloader_of

    layers = decoder_layers(model)
    onloader = onloader_of(model)
    inputs, kwargs = capture_block_inputs(model, calib.samples, layers)
    for i, layer in enumerate(layers):
        interrupt.checkpoint()
        samples = list(zip(inputs, kwargs))
        with onloader.onloaded(i) if onloader is not None else contextlib.nullcontext():
            for only in _stages(layer, samples[0]) if true_sequential else [None]:
                stats = _statistics(layer, samples, collect, only)
                solve_block(i, layer, stats, samples)
                del stats
            inputs = [_block_out(layer(x, **kw)) for x, kw in samples]
        if calib.on_block:
            calib.on_block(calib.step, i + 1, len(layers))


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _stages(layer: nn.Module, sample) -> list[set[str]]:
    """The block's linears grouped by the input tensor they read, in the order the forward pass reaches them."""
    order: list[tuple[int, str]] = []
    held = []  # inputs of this forward, held so no id is reused

    def hook(name):
        def take(_module, args, _out):
            held.append(args[0])
            order.append((id(args[0]), name))
        return take

    handles = [m.register_forward_hook(hook(n)) for n, m in _linears(layer).items()]
    try:
        x, kw = sample
        layer(x, **kw)
    finally:
        for h in handles:
            h.remove()
    stages: dict[int, set[str]] = {}
    for key, name in order:
        stages.setdefault(key, set()).add(name)
    return list(stages.values())


def _statistics(layer: nn.Module, samples: list, collect, only: set[str] | None) -> dict[str, Any]:
    """Run the samples through the block with accumulators on its linears (those in `only`; None: all), one
    accumulator for linears that read the same input tensor."""
    stats, handles = {}, []
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # input tensors of this forward, held so no id is reused
    alias: dict[str, str] = {}

    def hook(name, acc):
        def take(_module, args, out):
            x = args[0]
            first = seen.setdefault(id(x), (x, name))[1]
            if first == name:
                acc.add_batch(x.detach(), out.detach())
            else:
                alias[name] = first
        return take

    for name, module in _linears(layer).items():
        if only is not None and name not in only:
            continue
        acc = collect(name, module)
        if acc is not None:
            stats[name] = acc
            handles.append(module.register_forward_hook(hook(name, acc)))
    try:
        for x, kw in samples:
            seen.clear()
            layer(x, **kw)
    finally:
        for h in handles:
            h.remove()
    seen.clear()
    stats.update({name: stats[first] for name, first in alias.items()})
    return stats


class InputNorms:
    """Running mean of x_j^2 per input channel (Wanda's ||X_j||^2 / n)."""

    def __init__(self, linear: nn.Linear):
        self.sq = torch.zeros(linear.in_features, device=linear.weight.device, dtype=torch.float32)
        self.n = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).float()
        self.sq.mul_(self.n / (self.n + x.shape[0])).add_(x.pow(2).sum(0) / (self.n + x.shape[0]))
        self.n += x.shape[0]


class Hessian:
    """H = 2/n * sum x x^T over calibration tokens (the OBS/GPTQ layer Hessian), in float32."""

    def __init__(self, linear: nn.Linear):
        self.H = torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device,
                             dtype=torch.float32)
        self.n = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).float()
        tokens = x.shape[0]
        self.H.mul_(self.n / (self.n + tokens))
        self.n += tokens
        x = x.mul(math.sqrt(2 / self.n))
        self.H.addmm_(x.T, x)


class InputSample:
    """Mean |x_j| per channel and up to `max_rows` input rows (AWQ's activation statistics and search set)."""

    def __init__(self, linear: nn.Linear, max_rows: int = 2048):
        self.abs_sum = torch.zeros(linear.in_features, device=linear.weight.device, dtype=torch.float32)
        self.n = 0
        self.rows: list[torch.Tensor] = []
        self.max_rows = max_rows

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1])
        self.abs_sum += x.float().abs().sum(0)
        self.n += x.shape[0]
        have = sum(r.shape[0] for r in self.rows)
        if have < self.max_rows:
            self.rows.append(x[: self.max_rows - have].clone())

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)

    @property
    def x(self) -> torch.Tensor:
        return torch.cat(self.rows)
