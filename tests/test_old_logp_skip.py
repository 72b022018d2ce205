"""Skipping TRL's old-logp pass on on-policy batches (`skip_on_policy_old_logps`) changes no number.

With vLLM's importance-sampling correction TRL runs a no-grad forward over every row for the old log-probs; on an
on-policy batch those equal the training forward's detached ones, so the trainer computes the IS ratios and TRL's
`sampling/*` metrics from the training forward instead. Trained here at fp32 over three optimizer steps, skip on
vs TRL's path, through TRL's real `VLLMGeneration` over the vLLM stand-in (tests/vllm_standin.py) whose sampling
log-probs are perturbed, so the IS ratios are far from 1 and the clip / mask bounds of every mode are hit: the same
losses, gradients, IS metrics and EPO terms, in step mode (with row chunks) and trajectory mode; and an off-policy
config still runs the pass.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import tiny_args, train_recorded
from vllm_standin import Engine, Logprob, vllm_standin

from epo_trl import EPOConfig, EPOTrainer
from epo_trl.envs import task_dataset
from epo_trl.envs.maze import MazeFactory
from epo_trl.rollout import RolloutConfig, StepRollout, TrajectoryRollout, episode_return_reward
from epo_trl.trainers.grpo.step_batch import SAMPLING_METRICS

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
STEPS = 3
COMPARED = (*SAMPLING_METRICS, "loss", "entropy", "epo/smooth_penalty", "epo/out_of_band_frac", "epo/turn_entropy/0")


@pytest.fixture(autouse=True)
def noisy_engine(monkeypatch):
    monkeypatch.setattr(Engine, "_candidates", staticmethod(_noisy_candidates))


def _noisy_candidates(logps: torch.Tensor, token: int, k: int | None) -> dict[int, Logprob]:
    """The sampled token's log-prob off by a deterministic amount in [-1.5, 1.5]: the engine and the trainer
    disagree, as a bf16 engine or a different kernel does, only more."""
    exact = float(logps[token])
    return {token: Logprob(exact + 1.5 * math.sin(1000.0 * exact + token), 1)}


def _train(model_path, out, mode, counter, **overrides):
    """(trainer, losses, gradients per step) of STEPS EPO steps; `counter` counts no-grad policy forwards."""
    factory = MazeFactory(size=2, task="reach")
    rollout_cls = StepRollout if mode == "step" else TrajectoryRollout
    rollout = rollout_cls(factory, RolloutConfig(max_turns=3, max_turn_tokens=6, require_tags=False, num_workers=1))
    options = dict(
        max_steps=STEPS, max_completion_length=18, use_vllm=True, vllm_mode="colocate", vllm_sync_check=False,
        seed=3, per_device_train_batch_size=4, num_generations=4, entropy_coef=0.01, smoothing_coef=0.5,
    )  # fmt: skip
    options.update(overrides)
    with vllm_standin():
        try:
            result = train_recorded(
                lambda: _counting(
                    EPOTrainer(
                        model=model_path,
                        reward_funcs=[episode_return_reward],
                        args=tiny_args(EPOConfig, out, **options),
                        train_dataset=task_dataset(factory),
                        rollout_func=rollout,
                    ),
                    counter,
                )
            )
        finally:
            rollout.close()
    return result


def _counting(trainer, counter: list):
    forward = trainer._get_per_token_logps_and_entropies

    def counted(model, input_ids, *args, **kwargs):
        out = forward(model, input_ids, *args, **kwargs)
        if model is trainer.model and not torch.is_grad_enabled() and not torch.isnan(out[0]).all():
            counter.append(input_ids.size(0))  # rows of a no-grad policy forward: the old-logp pass
        return out

    trainer._get_per_token_logps_and_entropies = counted
    return trainer


def _logged(trainer) -> list[dict]:
    return [{k: v for k, v in h.items() if k in COMPARED} for h in trainer.state.log_history if "loss" in h]


def _assert_same(skip, trl_path):
    (trainer, losses, grads), (ref_trainer, ref_losses, ref_grads) = skip, trl_path
    assert len(losses) == STEPS and losses == pytest.approx(ref_losses, rel=0, abs=1e-6)
    assert len(grads) == len(ref_grads) == STEPS
    for step, (got, want) in enumerate(zip(grads, ref_grads)):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=f"step {step}: grad of {name}")
    logs, ref_logs = _logged(trainer), _logged(ref_trainer)
    for step, (got, want) in enumerate(zip(logs, ref_logs)):
        assert got.keys() == want.keys() and set(SAMPLING_METRICS) <= want.keys(), step
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), f"step {step}: {key}"
    ratios = [(h["sampling/importance_sampling_ratio/min"], h["sampling/importance_sampling_ratio/max"]) for h in logs]
    return ratios


@pytest.mark.parametrize(
    "mode, is_mode, overrides",
    [
        ("step", "token_truncate", dict(max_rows_per_backward=3)),  # micro-batches run as row chunks
        ("step", "sequence_mask", dict(gradient_accumulation_steps=2, steps_per_generation=1)),  # 2 batches a step
        ("trajectory", "token_mask", {}),
        ("trajectory", "sequence_truncate", dict(gradient_accumulation_steps=2, steps_per_generation=2)),
    ],
)
def test_skip_trains_exactly_as_trls_path(maze_model, tmp_path, mode, is_mode, overrides):
    """Skip on vs off (TRL's path): same losses, gradients at every step, IS metrics and EPO terms; no pass."""
    clip = dict(vllm_importance_sampling_clip_min=0.5) if is_mode.endswith("mask") else {}
    kw = dict(vllm_importance_sampling_mode=is_mode, **clip, **overrides)
    passes, trl_passes = [], []
    skip = _train(maze_model, tmp_path / "skip", mode, passes, **kw)
    trl_path = _train(maze_model, tmp_path / "trl", mode, trl_passes, skip_on_policy_old_logps=False, **kw)
    ratios = _assert_same(skip, trl_path)
    assert passes == [] and len(trl_passes) >= STEPS  # TRL's path scores every generation batch once more
    # The perturbed sampling log-probs make the correction do something: ratios far from 1, and the mask modes
    # drop rows or tokens (ratio 0) or truncate them at the clip bound.
    low, high = min(r[0] for r in ratios), max(r[1] for r in ratios)
    if is_mode.endswith("mask"):
        assert low == 0.0 and high > 1.2
    else:
        assert high == pytest.approx(3.0) and low < 0.8


def test_off_policy_batches_still_run_the_pass(maze_model, tmp_path):
    """num_iterations > 1 reuses a batch after an optimizer step: its old log-probs need their own forward."""
    passes = []
    trainer, losses, _ = _train(maze_model, tmp_path, "trajectory", passes, num_iterations=2)
    assert len(passes) >= 2 and all(math.isfinite(x) for x in losses)
    assert any(h.get("sampling/importance_sampling_ratio/max", 1.0) != 1.0 for h in trainer.state.log_history)


def test_the_benchmarks_unique_tokens_count_shared_prefixes_once():
    from research.bench.trainer_floor import unique_prefix_tokens

    # a group's copies of one prompt, two turns of an episode sharing their opening, and an unrelated row
    assert unique_prefix_tokens([(1, 2, 3), (1, 2, 4), (1, 2, 3), (5,)]) == 5
    assert unique_prefix_tokens([(7, 8), (7, 8, 9, 10)]) == 4 and unique_prefix_tokens([]) == 0


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("config", ["multi_gpu", "zero2"])
def test_skip_on_two_ranks_trains_as_trls_path(maze_model, tmp_path, config):
    """The skipped pass's metrics are gathered once per generation batch, as TRL's are: same weights and logs on 2
    ranks (step mode: rows padded to the same count on every rank, row chunks), under DDP and DeepSpeed ZeRO-2."""
    import json

    from scripts.epo_steps import accelerate_launch

    if config == "zero2":
        pytest.importorskip("deepspeed")
    script = os.path.join(os.path.dirname(__file__), "scripts", "old_logp_skip_ddp.py")
    proc = accelerate_launch(config, [script, maze_model, str(tmp_path), "skip_on_policy_old_logps"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    for rank in ranks:
        skip, trl_path = rank["runs"]["True"], rank["runs"]["False"]
        assert len(skip["logs"]) == 3 and skip["weights"].keys() == trl_path["weights"].keys()
        for name, value in trl_path["weights"].items():
            assert skip["weights"][name] == pytest.approx(value, rel=1e-5, abs=1e-4), name
        for got, want in zip(skip["logs"], trl_path["logs"]):
            assert got.keys() == want.keys() and set(SAMPLING_METRICS) <= want.keys()
            assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
        assert any(log["sampling/importance_sampling_ratio/max"] > 1.2 for log in skip["logs"])
    assert ranks[0]["runs"] == ranks[1]["runs"]  # DDP: one model, metrics reduced over ranks
