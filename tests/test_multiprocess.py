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
