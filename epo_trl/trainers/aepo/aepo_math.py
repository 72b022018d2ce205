"""Pure math of AEPO (docs/method.md, "AEPO: target-entropy control"): no trainer, no distributed state.

Equation tags (A1)-(A5) match the docs.
"""

from __future__ import annotations

import math

import torch


def choose_temperature(entropy: float | None, target: float, t_high: float, t_low: float) -> float:
    """(A1) T = T_high if H <= H* else T_low. No measurement yet (step 0) counts as H = 0, as released."""
    h = 0.0 if entropy is None else entropy
    return t_high if h <= target else t_low


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(A2) a_i = r_i - mean of r over i's group of `group_size` consecutive rows (NaN rewards are ignored).

    No std scaling: the threshold is on the raw reward scale, as released. A row whose reward is NaN (every
    reward function returned None) gets a NaN advantage, so it is never kept.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot form groups of {group_size} (aepo_num_resamples).")
    grouped = rewards.view(-1, group_size).float()
    return (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).view(-1)


def select_kept(advantages: torch.Tensor, threshold: float, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """(A3) Indices (ascending) of the rows with advantage > threshold ("correct" samples of mixed groups)."""
    keep = advantages > threshold  # NaN compares False
    if eligible is not None:
        keep = keep & eligible.bool()
    return keep.nonzero(as_tuple=True)[0]


def share_cap(counts: list[int], cap: int) -> list[int]:
    """(A3) Split a GLOBAL cap over ranks: rank r keeps q_r <= counts[r] rows, sum(q) = min(sum(counts), cap).

    Water-filling: every rank gets the same quota, capped by what it has; the remainder of an uneven split goes
    to the lowest ranks. Deterministic, so every rank computes the same split from the gathered counts.
    """
    quota = [0] * len(counts)
    left = min(sum(counts), cap)
    while left > 0:
        open_ranks = [r for r, c in enumerate(counts) if quota[r] < c]
        share = max(left // len(open_ranks), 1)
        for r in open_ranks:
            take = min(share, counts[r] - quota[r], left)
            quota[r] += take
            left -= take
            if left == 0:
                break
    return quota


def reinforce_sum(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(A4) Numerator of L_reg = -sum_j m_j log pi(o_j) / sum_j m_j: advantage +1 on every kept action token.

    Returned as a sum so the caller can divide by the GLOBAL token count (all ranks, all micro-batches):
    d/dz of -log softmax(z)[o] is softmax(z) - onehot(o).
    """
    return -(logps * mask).sum()


def sampled_entropy_sums(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(A5) Sampled estimator H ~ mean_j -log pi(o_j) over action tokens (the released measure): (sum, count)."""
    mask = mask.to(logps.dtype)
    return torch.stack([-(logps.detach() * mask).sum(), mask.sum()]).double()


def rows_per_micro_batch(num_rows: int, accumulation_steps: int) -> int:
    """Kept rows are split over the optimizer step's micro-batches (bounded memory): ceil(K / GA) per micro-batch."""
    return math.ceil(num_rows / max(accumulation_steps, 1)) if num_rows else 0
