"""Pure tensor functions for pruning: masks (True = prune) and the SparseGPT solver."""

from __future__ import annotations

import torch


def parse_nm(pattern: str) -> tuple[int, int]:
    n, m = (int(x) for x in pattern.split(":"))
    return n, m


def lowest_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the round(sparsity * numel) lowest scores of the whole tensor."""
    k = round(sparsity * score.numel())
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.view(-1)[score.flatten().topk(k, largest=False).indices] = True
    return mask


def lowest_per_row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the round(sparsity * cols) lowest scores of every output row (Wanda's comparison group)."""
    k = round(sparsity * score.shape[1])
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive input columns; prune the other m - n."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not a multiple of {m}")
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(m - n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def prepare_hessian(H: torch.Tensor, W: torch.Tensor, damp: float, inplace: bool = False) -> torch.Tensor:
    """Dead inputs get H_jj = 1 and zero weight; add damp * mean(diag H) to the diagonal; return the upper
    Cholesky factor of H^-1 (the rows OBS updates read). At most two n x n matrices besides H exist at once
    (inplace: H itself, a copy the caller made, is used up)."""
    H = H if inplace else H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    del H
    Hinv = torch.cholesky_inverse(L)
    del L
    return torch.linalg.cholesky(Hinv, upper=True)


def sparsegpt_(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.0, nm: tuple[int, int] | None = None,
               block: int = 128, damp: float = 0.01, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune W [rows, cols] to `sparsity` (adaptive mask per block of columns) or n:m, updating
    the remaining weights with OBS corrections from the Hessian. Returns the pruned weight (float32) and the
    mask (True = pruned). update=False: choose the mask the same way but leave the kept weights as they are."""
    W = W.float().clone()
    rows, cols = W.shape
    Hinv = prepare_hessian(H, W, damp)
    mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        # the block's columns as contiguous rows (transposed): each column's update is one contiguous sweep
        W1 = W[:, i1:i2].T.contiguous()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if nm is None:
            mask1 = lowest_mask(W1.pow(2) / d.pow(2).unsqueeze(1), sparsity)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                score = W1[i:i + nm[1]].pow(2) / d[i:i + nm[1]].pow(2).unsqueeze(1)
                mask1[i:i + nm[1]] = nm_mask(score.T, *nm).T
            w = W1[i].clone()
            W1[i].masked_fill_(mask1[i], 0)
            if not update:
                continue
            err = (w - W1[i]) / d[i]
            W1[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1)
            Err1[i] = err
        W[:, i1:i2] = W1.T
        mask[:, i1:i2] = mask1.T
        if update:
            W[:, i2:] -= Err1.T @ Hinv[i1:i2, i2:]
    return W, mask
