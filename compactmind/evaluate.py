"""Perplexity per the GPTQ / SparseGPT / Wanda protocol: PPL = exp(mean token NLL over all windows).

Each window is scored on its own (no context carried over); the loss of a window is the mean NLL of its
seq_len - 1 next-token predictions, as `model(w, labels=w).loss` computes it. For models whose head is a plain
linear layer the loss is computed in chunks of positions, so full-vocabulary FP32 logits for a whole batch are
never materialised; the result is the same number. The KL divergence to a reference model's next-token
distributions (EvoPress's fitness) is computed the same way, against the reference's stored log-probabilities.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compactmind import interrupt

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


def _split_model(model: nn.Module):
    head = model.get_output_embeddings()
    if getattr(model.config, "model_type", None) in _PLAIN_HEAD and isinstance(head, nn.Linear) \
            and hasattr(model, "model"):
        return model.model, head
    return None, None


def _chunks(model: nn.Module, batch: torch.Tensor, chunk: int = 512):
    """(logits [B, c, V] float32, targets [B, c]) over the next-token predictions of `batch` [B, L], a chunk of
    positions at a time where the head is a plain linear layer (never the whole batch's FP32 logits at once)."""
    body, head = _split_model(model)
    targets = batch[:, 1:]
    if body is None:
        yield model(input_ids=batch, use_cache=False).logits[:, :-1].float(), targets
        return
    hidden = body(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
    for s in range(0, hidden.shape[1], chunk):
        yield head(hidden[:, s:s + chunk]).float(), targets[:, s:s + chunk]


@torch.inference_mode()
def window_nll(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL for each window of `batch` [B, L] -> [B] (float64)."""
    total = torch.zeros(batch.shape[0], dtype=torch.float64, device=batch.device)
    for logits, targets in _chunks(model, batch):
        total += _token_nll(logits, targets).sum(1)
    return total


@torch.inference_mode()
def window_logprobs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [B, L-1, V] (float16, on the CPU): a reference for KL divergence."""
    return torch.cat([F.log_softmax(logits, -1).clamp(min=-60).half().cpu() for logits, _ in _chunks(model, batch)], 1)


@torch.inference_mode()
def window_kl(model: nn.Module, batch: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over positions of KL(reference || model), and of the next-token NLL, for each window of `batch`
    [B, L] -> ([B], [B]) (float64); `reference` [B, L-1, V] holds the reference model's log-probabilities
    (window_logprobs)."""
    kl = torch.zeros(batch.shape[0], dtype=torch.float64, device=batch.device)
    nll = torch.zeros_like(kl)
    done = 0
    for logits, targets in _chunks(model, batch):
        ref = reference[:, done:done + logits.shape[1]].to(logits.device).float()
        ref = ref - ref.logsumexp(-1, keepdim=True)  # stored in FP16: normalised again, so KL is never below 0
        done += logits.shape[1]
        logp = F.log_softmax(logits, -1)
        kl += (ref.exp() * (ref - logp)).sum(-1).double().sum(1)
        nll -= logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().sum(1)
    return kl, nll


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits, [B, L] targets -> [B, L] NLL (float64). Rows-by-vocab layout: the [B, V, L] layout
    runs a strided log-softmax that is off by up to 3e-4 nats per token in FP32."""
    b, n, v = logits.shape
    return F.cross_entropy(logits.reshape(b * n, v), targets.reshape(b * n), reduction="none").double().view(b, n)


def _scan(model: nn.Module, windows: torch.Tensor, batch_size: int, window_sums, to_value, stop, progress):
    """Score `windows` [N, L] in order: window_sums(batch, first index) -> per-window loss sums; to_value(mean
    loss per token) -> the figure stop(figure so far, windows done) sees. Returns (mean, done, reason, sums)."""
    device = next(model.parameters()).device
    total, done, reason, sums = 0.0, 0, None, []
    per_window = windows.shape[1] - 1
    for i in range(0, windows.shape[0], batch_size):
        interrupt.checkpoint()
        batch = windows[i:i + batch_size].to(device)
        part = window_sums(batch, i).tolist()
        sums += part
        total += sum(part)
        done += batch.shape[0]
        if progress:
            progress(done, windows.shape[0])
        running = total / (done * per_window)
        if not math.isfinite(running):
            break
        if stop is not None and done < windows.shape[0]:
            reason = stop(to_value(running), done)
            if reason:
                break
    return total / (done * per_window), done, reason, sums


def _exp(nll: float) -> float:
    return math.exp(nll) if math.isfinite(nll) and nll < 700 else (math.inf if nll == nll else math.nan)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
               stop: Callable[[float, int], str | None] | None = None,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Evaluate `windows` [N, L] in order. `stop(running_ppl, windows_done)` may return a reason to stop early."""
    start = time.perf_counter()
    nll, done, reason, sums = _scan(model, windows, batch_size, lambda batch, _i: window_nll(model, batch),
                                    lambda mean: math.exp(min(mean, 700.0)), stop, progress)
    return Perplexity(_exp(nll), nll, done, done * windows.shape[1], time.perf_counter() - start, reason, tuple(sums))


@dataclass(frozen=True)
class Divergence:
    kl: float  # mean KL(reference || model) per predicted token (nats)
    windows: int
    tokens: int
    seconds: float
    stopped: str | None = None
    window_kl: tuple[float, ...] = ()  # summed KL of each evaluated window, in order
    perplexity: float | None = None  # of the same windows


def kl_divergence(model: nn.Module, windows: torch.Tensor, reference: torch.Tensor, batch_size: int = 1,
                  stop: Callable[[float, int], str | None] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> Divergence:
    """Mean KL divergence from the reference model's next-token distributions (`reference` [N, L-1, V] from
    window_logprobs) to this model's, over `windows` [N, L] in order; `stop(running KL, windows done)`."""
    start = time.perf_counter()
    nll: list[float] = []

    def sums(batch, i):
        kl, batch_nll = window_kl(model, batch, reference[i:i + batch.shape[0]])
        nll.extend(batch_nll.tolist())
        return kl

    kl, done, reason, kl_sums = _scan(model, windows, batch_size, sums, lambda mean: mean, stop, progress)
    ppl = _exp(sum(nll) / (done * (windows.shape[1] - 1))) if done else math.nan
    return Divergence(kl, done, done * windows.shape[1], time.perf_counter() - start, reason, tuple(kl_sums), ppl)


def running_mean(window_sums, seq_len: int) -> list[float]:
    """Mean per-token loss over the first k windows of recorded per-window sums, for k = 1, 2, ..."""
    out, total = [], 0.0
    for k, value in enumerate(window_sums, 1):
        total += value
        out.append(total / (k * (seq_len - 1)))
    return out
