"""Calibration samples handed to methods, and a cache of statistics measured on the dense model.

Statistics of the dense model (for example SmoothQuant's activation maxima) do not depend on the trial, so a
method that runs as the first step of a pipeline asks the cache, and the first trial that needs them pays once
per study. A method that runs after another step sees a changed model and measures afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compactmind.errors import CalibrationError


@dataclass
class Calibration:
    samples: torch.Tensor  # [n, seq_len] token ids
    model_is_dense: bool = True  # set by the pipeline executor before each step
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
