"""Pure per-turn math every method shares. No trainer, no project imports: tensors in, tensors out.

Equation names refer to docs/method.md:
  (E1) turn(j)      turn index of action token j  = number of action-token runs started up to j
  (E2) h_k[t]       per-turn token-mean entropy at optimizer step k (from `per_turn_sums`)
  (E5) mean_j       sum_j m_j v_j / sum_j m_j, the token mean of TRL's entropy bonus and EPO's L_smooth
"""

from __future__ import annotations

import torch

NO_TURN = -1  # turn id of tokens that are not action tokens (prompt padding, env observations)


def turn_ids_from_mask(action_mask: torch.Tensor, turn_offset: torch.Tensor | None = None) -> torch.Tensor:
    """(E1) Turn index of every action token; `NO_TURN` elsewhere.

    A turn is a maximal run of action tokens (mask == 1) within a row: observation tokens between two
    runs separate turns, padding after the last run does not start one. `turn_offset` (B,) shifts a
    row's turns, e.g. step-mode rows that each hold turn `t` of an episode carry offset `t`.
    """
    mask = action_mask.bool()
    prev = torch.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    starts = mask & ~prev  # first token of each run
    ids = torch.cumsum(starts.long(), dim=1) - 1
    if turn_offset is not None:
        ids = ids + turn_offset.long().view(-1, 1)
    return torch.where(mask, ids, torch.full_like(ids, NO_TURN))


def per_turn_sums(values: torch.Tensor, turn_ids: torch.Tensor, num_turns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of `values` per turn over all rows: the sufficient statistics of (E2).

    Kept as sums (not means) so micro-batches and ranks can be added before dividing.
    """
    valid = turn_ids >= 0
    idx = turn_ids[valid]
    sums = torch.zeros(num_turns, dtype=torch.float64, device=values.device)
    counts = torch.zeros(num_turns, dtype=torch.float64, device=values.device)
    sums.index_add_(0, idx, values.detach()[valid].to(torch.float64))
    counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    return sums, counts


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(E5) sum_j m_j v_j / sum_j m_j (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
