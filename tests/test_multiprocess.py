"""Multi-process correctness: the EPO state must be identical on every rank (accelerate DDP, 2 CPU processes)."""

import pytest
import torch
from scripts.epo_steps import NUM_STEPS, load_run, run_once


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_hold_identical_histories(tiny_model, tmp_path_factory):
    (r0, r1), (p0, p1) = load_run(run_once("multi_gpu", tiny_model, tmp_path_factory))
    assert r0["world"] == 2 and r0["distributed_type"] == "DistributedType.MULTI_CPU"
    assert set(r0["prompts"]) != set(r1["prompts"])  # different data per rank
    assert r0["history"] == r1["history"]  # bit-identical reference state on both ranks
    assert r0["history"]["num_steps"] == NUM_STEPS
    # rank 0 played 2 turns, rank 1 three: the shared history holds turns 0-2, turn 2 only from rank 1
    assert sorted(r0["history"]["turns"], key=int) == ["0", "1", "2"]
    assert all(torch.equal(p0[name], p1[name]) for name in p0)


@pytest.mark.multiprocess
def test_a_plain_user_script_exits_cleanly_on_both_ranks(tiny_model, tmp_path):
    """A user's script under `accelerate launch --num_processes 2` that builds an EPOTrainer, trains a step and
    returns, with no teardown of its own: both ranks exit 0, and the process group is gone before the interpreter
    finalizes (a live gloo group there can abort the process after a run that succeeded)."""
    import json
    import os

    from scripts.epo_steps import accelerate_launch

    script = os.path.join(os.path.dirname(__file__), "scripts", "user_script.py")
    proc = accelerate_launch("multi_gpu", [script, tiny_model, str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr
    for rank in (0, 1):
        assert json.loads((tmp_path / f"trained{rank}.json").read_text()) == {"world": 2, "step": 1}
        assert json.loads((tmp_path / f"exit{rank}.json").read_text()) == {"group_alive_at_exit": False}
