"""Pure entropy math for EPO. No trainer, no project imports: tensors in, tensors out.

Equation names refer to docs/method.md (EPO, arXiv 2509.22576); (E1) turn ids, (E2) per-turn means and the (E5)
token mean are every method's, in trainers/grpo/turn_math.py:
  (E3) H_ref[t]     mean of h_j[t] over earlier steps j < k where turn t occurred (optionally last W)
  (E4) P_j          relu(kappa_low * H_ref[t] - H_j) + relu(H_j - kappa_high * H_ref[t])
  (E5) L_smooth     sum_j m_j P_j / sum_j m_j   (turn_math.masked_token_mean)
  (E6) beta_k       phase schedule (released `_calculate_epoch_based_entropy_weight`)
"""

from __future__ import annotations

import math
from collections import deque

import torch


def smoothing_penalty(
    entropies: torch.Tensor,
    turn_ids: torch.Tensor,
    reference: torch.Tensor,
    has_reference: torch.Tensor,
    kappa_low: float,
    kappa_high: float,
    start_turn: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4) Differentiable two-sided hinge of each token's entropy around its turn's reference band.

    Returns (penalty P_j, active) both (B, T): `active` marks action tokens whose turn has a reference
    and is >= `start_turn`; P is 0 elsewhere. Gradient of P w.r.t. H_j is -1 below the band
    (raises entropy), +1 above it (lowers entropy), 0 inside.
    """
    n = reference.numel()
    in_range = (turn_ids >= start_turn) & (turn_ids >= 0) & (turn_ids < n)
    safe_ids = turn_ids.clamp(min=0, max=max(n - 1, 0))
    if n == 0:
        zero = torch.zeros_like(entropies)
        return zero, torch.zeros_like(entropies, dtype=torch.bool)
    active = in_range & has_reference.to(entropies.device)[safe_ids]
    ref = reference.to(device=entropies.device, dtype=entropies.dtype)[safe_ids]
    penalty = torch.relu(kappa_low * ref - entropies) + torch.relu(entropies - kappa_high * ref)  # (E4)
    return torch.where(active, penalty, torch.zeros_like(penalty)), active


def phase_schedule(step: int, horizon: int, gamma: float = 3.0) -> float:
    """(E6) beta_k: gentle decay 1 -> 0.8 over the first half, then exponential decay from 0.8.

    k <= K/2:  1 - 0.2 (1 - exp(-2k / (K/2)))
    k >  K/2:  0.8 exp(-gamma (k - K/2) / (K/2))
    """
    half = horizon / 2.0
    if step <= half:
        return 1.0 - 0.2 * (1.0 - math.exp(-2.0 * step / half))
    return 0.8 * math.exp(-gamma * (step - half) / half)


class EntropyHistory:
    """(E3) Per-turn reference entropies from the per-turn means of earlier optimizer steps.

    A turn is recorded only at steps where it occurred (no zero padding); `window=None` keeps the
    cumulative mean over all of them (released behaviour), `window=W` the mean of the last W.
    """

    def __init__(self, window: int | None = None):
        if window is not None and window < 1:
            raise ValueError(f"window must be None (cumulative) or >= 1, got {window}")
        self.window = window
        self.num_steps = 0
        # cumulative: turn -> [sum, count]; windowed: turn -> deque of the last W step means
        self._cum: dict[int, list[float]] = {}
        self._win: dict[int, deque] = {}

    def update(self, turn_means: dict[int, float]) -> None:
        """Record one optimizer step's per-turn means h_k[t] (E2) for the turns that occurred."""
        for turn, value in turn_means.items():
            if self.window is None:
                acc = self._cum.setdefault(int(turn), [0.0, 0])
                acc[0] += float(value)
                acc[1] += 1
            else:
                self._win.setdefault(int(turn), deque(maxlen=self.window)).append(float(value))
        self.num_steps += 1

    def turns(self) -> list[int]:
        return sorted(self._cum if self.window is None else self._win)

    def mean(self, turn: int) -> float | None:
        if self.window is None:
            acc = self._cum.get(turn)
            return None if acc is None else acc[0] / acc[1]
        vals = self._win.get(turn)
        return None if not vals else sum(vals) / len(vals)

    def reference(self, num_turns: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(E3) H_ref as a dense (num_turns,) tensor plus a bool mask of turns that have a reference."""
        known = self.turns()
        n = num_turns if num_turns is not None else (known[-1] + 1 if known else 0)
        ref = torch.zeros(n, dtype=torch.float32)
        has = torch.zeros(n, dtype=torch.bool)
        for t in known:
            if t < n:
                ref[t] = self.mean(t)
                has[t] = True
        return ref, has

    def state_dict(self) -> dict:
        if self.window is None:
            turns = {str(t): list(v) for t, v in self._cum.items()}
        else:
            turns = {str(t): list(v) for t, v in self._win.items()}
        return {"window": self.window, "num_steps": self.num_steps, "turns": turns}

    def load_state_dict(self, state: dict) -> None:
        if state.get("window") != self.window:
            raise ValueError(
                f"Checkpoint entropy history has window={state.get('window')} but the config has "
                f"entropy_history_window={self.window}; resume with the same entropy_history_window."
            )
        self.num_steps = int(state["num_steps"])
        if self.window is None:
            self._cum = {int(t): [float(v[0]), int(v[1])] for t, v in state["turns"].items()}
        else:
            self._win = {int(t): deque(map(float, v), maxlen=self.window) for t, v in state["turns"].items()}
