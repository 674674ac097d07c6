"""Perplexity per the GPTQ / SparseGPT / Wanda protocol: PPL = exp(mean token NLL over all windows).

Each window is scored on its own (no context carried over); the loss of a window is the mean NLL of its
seq_len - 1 next-token predictions, as `model(w, labels=w).loss` computes it. For models whose head is a plain
linear layer the loss is computed in chunks of positions, so full-vocabulary FP32 logits for a whole batch are
never materialised; the result is the same number.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Architectures whose logits are exactly lm_head(final hidden state): no soft-capping or scaling.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2"}


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean token negative log-likelihood (nats)
    windows: int
    tokens: int  # tokens in the evaluated windows
    seconds: float
    stopped: str | None = None  # why evaluation stopped early, if it did
    window_nll: tuple[float, ...] = ()  # summed NLL of each evaluated window, in order


def running_perplexity(window_nll, seq_len: int) -> list[float]:
    """Perplexity over the first k windows of a recorded `window_nll`, for k = 1, 2, ..."""
    out, total = [], 0.0
    for k, nll in enumerate(window_nll, 1):
        total += nll
        out.append(math.exp(min(total / (k * (seq_len - 1)), 700.0)))
    return out


def _split_model(model: nn.Module):
    head = model.get_output_embeddings()
    if getattr(model.config, "model_type", None) in _PLAIN_HEAD and isinstance(head, nn.Linear) \
            and hasattr(model, "model"):
        return model.model, head
    return None, None


@torch.inference_mode()
def window_nll(model: nn.Module, batch: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Sum of next-token NLL for each window of `batch` [B, L] -> [B] (float64)."""
    body, head = _split_model(model)
    targets = batch[:, 1:]
    if body is None:
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        return _token_nll(logits, targets).sum(1)
    hidden = body(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
    total = torch.zeros(batch.shape[0], dtype=torch.float64, device=batch.device)
    for s in range(0, hidden.shape[1], chunk):
        total += _token_nll(head(hidden[:, s:s + chunk]).float(), targets[:, s:s + chunk]).sum(1)
    return total


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits, [B, L] targets -> [B, L] NLL (float64). Rows-by-vocab layout: the [B, V, L] layout
    runs a strided log-softmax that is off by up to 3e-4 nats per token in FP32."""
    b, n, v = logits.shape
    return F.cross_entropy(logits.reshape(b * n, v), targets.reshape(b * n), reduction="none").double().view(b, n)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
               stop: Callable[[float, int], str | None] | None = None,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Evaluate `windows` [N, L] in order. `stop(running_ppl, windows_done)` may return a reason to stop early."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    nll_sum, done, reason, nlls = 0.0, 0, None, []
    per_window = windows.shape[1] - 1
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i:i + batch_size].to(device)
        sums = window_nll(model, batch).tolist()
        nlls += sums
        nll_sum += sum(sums)
        done += batch.shape[0]
        if progress:
            progress(done, windows.shape[0])
        running = nll_sum / (done * per_window)
        if not math.isfinite(running):
            break
        if stop is not None and done < windows.shape[0]:
            reason = stop(math.exp(min(running, 700.0)), done)
            if reason:
                break
    nll = nll_sum / (done * per_window)
    ppl = math.exp(nll) if math.isfinite(nll) and nll < 700 else (math.inf if nll == nll else math.nan)
    return Perplexity(ppl, nll, done, done * windows.shape[1], time.perf_counter() - start, reason, tuple(nlls))
