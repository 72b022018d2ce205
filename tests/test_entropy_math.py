"""EPO math against hand-computed values (docs/method.md, equations E1-E6)."""

import math

import pytest
import torch

from epo_trl.trainers.epo.epo_math import EntropyHistory, phase_schedule, smoothing_penalty
from epo_trl.trainers.grpo.turn_math import NO_TURN, masked_token_mean, per_turn_sums, turn_ids_from_mask

X = NO_TURN


def test_turn_ids_multi_turn_with_padding():
    # row 0: turn0 (2 tok), obs (1), turn1 (3 tok), obs (2), turn2 (1 tok), right padding (2)
    # row 1: a single turn of 3 tokens then padding; row 2: all padding
    mask = torch.tensor(
        [
            [1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    expected = torch.tensor(
        [
            [0, 0, X, 1, 1, 1, X, X, 2, X, X],
            [0, 0, 0, X, X, X, X, X, X, X, X],
            [X, X, X, X, X, X, X, X, X, X, X],
        ]
    )
    assert torch.equal(turn_ids_from_mask(mask), expected)


def test_turn_ids_step_mode_offsets():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = turn_ids_from_mask(mask, torch.tensor([4, 0]))
    assert torch.equal(out, torch.tensor([[4, 4, X], [0, X, X]]))


def test_per_turn_sums_by_hand():
    ent = torch.tensor([[1.0, 3.0, 9.0, 2.0], [5.0, 7.0, 9.0, 9.0]])
    ids = torch.tensor([[0, 0, X, 1], [0, 2, X, X]])
    sums, counts = per_turn_sums(ent, ids, 3)
    assert sums.tolist() == [9.0, 2.0, 7.0]  # turn0: 1+3+5, turn1: 2, turn2: 7
    assert counts.tolist() == [3.0, 1.0, 1.0]


def test_hinge_penalty_values_and_gradient_signs():
    # reference 1.0 for turn 0, kappa band [0.5, 2.0] -> tokens at 0.2 (below), 1.0 (inside), 3.0 (above)
    ent = torch.tensor([[0.2, 1.0, 3.0, 5.0]], requires_grad=True)
    ids = torch.tensor([[0, 0, 0, 1]])  # turn 1 has no reference -> no penalty
    ref = torch.tensor([1.0, 0.0])
    has = torch.tensor([True, False])
    pen, active = smoothing_penalty(ent, ids, ref, has, kappa_low=0.5, kappa_high=2.0)
    # below: 0.5*1 - 0.2 = 0.3; inside: 0; above: 3 - 2*1 = 1.0; no reference: 0
    assert pen.detach().tolist()[0] == pytest.approx([0.3, 0.0, 1.0, 0.0])
    assert active.tolist() == [[True, True, True, False]]
    pen.sum().backward()
    assert ent.grad.tolist() == [[-1.0, 0.0, 1.0, 0.0]]  # raise low entropy, lower high entropy


def test_hinge_start_turn_and_mean():
    ent = torch.tensor([[4.0, 4.0, 4.0]])
    ids = torch.tensor([[0, 1, X]])
    ref = torch.tensor([1.0, 1.0])
    has = torch.tensor([True, True])
    pen, _ = smoothing_penalty(ent, ids, ref, has, 0.0, 2.0, start_turn=1)
    assert pen.tolist() == [[0.0, 2.0, 0.0]]  # turn 0 is before start_turn
    # L_smooth = (0 + 2) / 2 action tokens (padding excluded) = 1.0
    assert masked_token_mean(pen, torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.0)


def test_released_constant_penalty_has_no_gradient():
    """The authors' `torch.where(inside, 0, alpha)` is a constant: it cannot move the policy. Ours does."""
    ent = torch.tensor([5.0], requires_grad=True)
    released = torch.where(ent < 2.0, torch.tensor(0.0), torch.tensor(0.1))
    assert not released.requires_grad
    ours, _ = smoothing_penalty(
        ent.view(1, 1), torch.tensor([[0]]), torch.tensor([1.0]), torch.tensor([True]), 0.0, 2.0
    )
    ours.sum().backward()
    assert ent.grad.item() == 1.0


@pytest.mark.parametrize(
    "k,expected", [(0, 1.0), (40, 0.869), (75, 0.827), (76, 0.769), (100, 0.294), (125, 0.108), (150, 0.040)]
)
def test_phase_schedule_check_values(k, expected):
    assert phase_schedule(k, 150, 3.0) == pytest.approx(expected, abs=5e-4)


def test_phase_schedule_by_formula():
    # k=40, K=150: 1 - 0.2 * (1 - exp(-80/75))
    assert phase_schedule(40, 150) == pytest.approx(1 - 0.2 * (1 - math.exp(-80 / 75)))
    # k=100: 0.8 * exp(-3 * 25/75) = 0.8 * e^-1
    assert phase_schedule(100, 150) == pytest.approx(0.8 * math.exp(-1.0))


def test_history_cumulative_with_missing_turns():
    h = EntropyHistory()
    ref, has = h.reference()
    assert ref.numel() == 0 and has.numel() == 0  # step 0: no reference at all
    h.update({0: 2.0, 1: 4.0})
    h.update({0: 1.0})  # turn 1 absent: NOT recorded as 0
    h.update({0: 3.0, 2: 6.0})
    ref, has = h.reference()
    assert ref.tolist() == pytest.approx([2.0, 4.0, 6.0])  # (2+1+3)/3, 4/1, 6/1
    assert has.tolist() == [True, True, True]
    ref, has = h.reference(5)
    assert has.tolist() == [True, True, True, False, False]


def test_history_windowed():
    h = EntropyHistory(window=2)
    for v in [1.0, 2.0, 4.0]:
        h.update({0: v})
    h.update({1: 10.0})
    assert h.mean(0) == pytest.approx(3.0)  # last two recorded values of turn 0: (2+4)/2
    assert h.mean(1) == pytest.approx(10.0)
    assert h.mean(7) is None


def test_history_roundtrip_is_exact():
    import json

    for window in (None, 3):
        h = EntropyHistory(window)
        for step in range(5):
            h.update({t: 0.1 * step + 1 / 3 + t for t in range(step % 3 + 1)})
        h2 = EntropyHistory(window)
        h2.load_state_dict(json.loads(json.dumps(h.state_dict())))
        assert h2.state_dict() == h.state_dict()
        assert torch.equal(h2.reference()[0], h.reference()[0])
    with pytest.raises(ValueError, match="entropy_history_window"):
        EntropyHistory(window=None).load_state_dict(EntropyHistory(window=2).state_dict())
