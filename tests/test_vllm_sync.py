"""The GPU training path, driven end to end on CPU: real EPOTrainer / AEPOTrainer steps through TRL 1.16's real
`VLLMGeneration` over the vLLM stand-in (tests/vllm_standin.py), whose engine samples from the weights TRL pushed.

For every generate call we know the optimizer step it served and the weights vLLM held at that moment; they must be
the trainer's weights after exactly that many optimizer steps (sync once per step, before its first generate).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from helpers import tiny_args
from transformers import TrainerCallback
from vllm_standin import model_checksums, vllm_standin

from epo_trl import EPOConfig, EPOTrainer
from epo_trl.envs import task_dataset
from epo_trl.envs.maze import MazeFactory
from epo_trl.rollout import RolloutConfig, StepRollout, TrajectoryRollout, episode_return_reward
from epo_trl.trainers.aepo.aepo_config import AEPOConfig
from epo_trl.trainers.aepo.aepo_trainer import AEPOTrainer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
STEPS = 3


class WeightsPerStep(TrainerCallback):
    """The trainer's parameter checksums after 0, 1, 2, ... optimizer steps."""

    def __init__(self):
        self.after: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.after = [model_checksums(model)]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after.append(model_checksums(model))


def train_through_vllm(model_path, out, trainer_cls, config_cls, mode, **overrides):
    """Train STEPS optimizer steps; return (engine, weights per step, generate calls as (step, weights held))."""
    factory = MazeFactory(size=2, task="reach")
    rollout_cls = StepRollout if mode == "step" else TrajectoryRollout
    rollout = rollout_cls(factory, RolloutConfig(max_turns=3, max_turn_tokens=6, require_tags=False, num_workers=2))
    options = dict(max_steps=STEPS, max_completion_length=6, use_vllm=True, vllm_mode="colocate", seed=3)
    weights = WeightsPerStep()
    with vllm_standin() as standin:
        trainer = trainer_cls(
            model=model_path,
            reward_funcs=[episode_return_reward],
            args=tiny_args(config_cls, out, **{**options, **overrides}),
            train_dataset=task_dataset(factory),
            rollout_func=rollout,
            callbacks=[weights],
        )
        (engine,) = standin.engines
        generate, calls = trainer.vllm_generation.generate, []

        def spy(*args, **kwargs):  # the step this call serves, and the weights vLLM holds when it starts
            out = generate(*args, **kwargs)
            calls.append((trainer.state.global_step, engine.synced[-1] if engine.synced else None))
            return out

        trainer.vllm_generation.generate = spy
        try:
            trainer.train()
        finally:
            rollout.close()
    return engine, weights.after, calls


@pytest.mark.parametrize("mode", ["step", "trajectory"])
def test_epo_samples_from_the_current_weights_every_step(maze_model, tmp_path, mode):
    engine, weights, calls = train_through_vllm(maze_model, tmp_path, EPOTrainer, EPOConfig, mode)
    assert len(weights) == STEPS + 1 and weights[1] != weights[0]  # training does move the weights
    # exactly one push per optimizer step, of that step's weights
    assert engine.synced == weights[:STEPS]
    # every generate of step k ran on step k's weights, and each step generated (a sync precedes the first one)
    assert sorted({step for step, _ in calls}) == list(range(STEPS))
    for step, held in calls:
        assert held == weights[step], f"a generate of step {step} sampled from other weights"
    kinds = [e[0] for e in engine.events if e[0] in ("sync", "generate")]
    assert kinds[0] == "sync" and kinds.count("sync") == STEPS


def test_sleep_mode_resyncs_on_every_wake_with_current_weights(maze_model, tmp_path):
    engine, weights, calls = train_through_vllm(
        maze_model, tmp_path, EPOTrainer, EPOConfig, "step", vllm_enable_sleep_mode=True
    )
    # sleep level 2 discards the weights after every generate: the step's push serves its first generate, TRL's
    # re-push on wake every later one (the engine refuses to generate from discarded weights)
    assert len(engine.synced) == len(calls) > STEPS
    for step, held in calls:
        assert held == weights[step]
    assert all(e != ("generate", 0) for e in engine.events)


def test_aepo_resamples_use_the_steps_weights(maze_model, tmp_path):
    engine, weights, calls = train_through_vllm(
        maze_model,
        tmp_path,
        AEPOTrainer,
        AEPOConfig,
        "trajectory",
        aepo_coef=0.5,
        aepo_num_resamples=2,
        aepo_resample_share=0.5,
    )
    assert engine.synced == weights[:STEPS]
    per_step = [sum(1 for s, _ in calls if s == k) for k in range(STEPS)]
    assert all(n >= 2 for n in per_step), per_step  # the rollout's turns and AEPO's re-sampled episodes
    for step, held in calls:
        assert held == weights[step]


def test_rollouts_sample_at_the_trainers_temperature(maze_model, tmp_path):
    """One temperature, the trainer's (TRL scores samples at it): RolloutConfig has none of its own."""
    assert "temperature" not in {f.name for f in dataclasses.fields(RolloutConfig)}
    engine, _, _ = train_through_vllm(
        maze_model, tmp_path, EPOTrainer, EPOConfig, "step", temperature=0.7, max_steps=1
    )
    assert engine.temperatures and set(engine.temperatures) == {0.7}


def test_several_vllm_servers_share_each_generate_and_all_get_every_sync(maze_model, tmp_path):
    urls = ["http://node-a:8000", "http://node-b:8000"]
    factory = MazeFactory(size=2, task="reach")
    rollout = StepRollout(factory, RolloutConfig(max_turns=2, max_turn_tokens=4, require_tags=False))
    args = tiny_args(EPOConfig, tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_urls=urls)
    weights = WeightsPerStep()
    with vllm_standin(model_path=maze_model) as standin:
        trainer = EPOTrainer(maze_model, [episode_return_reward], args=args, train_dataset=task_dataset(factory),
                             rollout_func=rollout, callbacks=[weights])  # fmt: skip
        trainer.train()
        rollout.close()
    assert [c.base_url for c in trainer.vllm_generation.vllm_client.clients] == urls
    # the check scored the probe on both servers after each push: same weights, same log-probs (float64 stand-in
    # engines against the fp32 trainer)
    assert len(trainer.vllm_sync_check.diffs) == 2 and max(trainer.vllm_sync_check.diffs) < 1e-5
    a, b = standin.engines
    assert a.synced == b.synced == weights.after[:2]  # every server gets each step's weights
    # Right after each push, the sync check probes every server with one prompt; the rollouts' generates follow.
    for engine in (a, b):
        after_push = [engine.events[i + 1] for i, e in enumerate(engine.events[:-1]) if e[0] == "reset_prefix_cache"]
        assert after_push == [("generate", 1)] * len(engine.synced)
    sizes_a, sizes_b = ([e[1] for i, e in enumerate(x.events) if e[0] == "generate" and x.events[i - 1][0] != "reset_prefix_cache"] for x in (a, b))  # fmt: skip
    assert len(sizes_a) == len(sizes_b) >= 2 and all(abs(x - y) <= 1 for x, y in zip(sizes_a, sizes_b))
    assert sizes_a[0] + sizes_b[0] == 4  # the first turn's 4 episodes, split 2 + 2


def test_server_urls_need_server_mode(tmp_path):
    with pytest.raises(ValueError, match="vllm_server_base_urls"):
        EPOConfig(output_dir=str(tmp_path), vllm_server_base_urls=["http://a:1", "http://b:1"], vllm_mode="colocate")


@pytest.mark.parametrize("fault", ["drop", "garble"])
def test_a_server_that_drops_or_garbles_the_weights_fails_the_sync_check(maze_model, tmp_path, monkeypatch, fault):
    """Server mode's push (NCCL on a GPU) cannot run here for real: the stand-in server ignores what it is sent
    (drop) or loads it scaled tenfold (garble), and the probe after the push must see that its weights are not the
    trainer's: a dropped update at step 1 (step 0 pushes the weights the server loaded), a garbled one at once."""
    from vllm_standin import FakeVLLMClient

    from epo_trl.trainers.vllm_sync import StaleEngineError

    load = FakeVLLMClient.update_named_params
    if fault == "drop":
        monkeypatch.setattr(FakeVLLMClient, "update_named_params", lambda self, metadata, params: [p for p in params])
    else:
        monkeypatch.setattr(FakeVLLMClient, "update_named_params",
                            lambda self, metadata, params: load(self, metadata, ((n, t * 10) for n, t in params)))  # fmt: skip
    factory = MazeFactory(size=2, task="reach")
    rollout = StepRollout(factory, RolloutConfig(max_turns=2, max_turn_tokens=4, require_tags=False))
    args = tiny_args(EPOConfig, tmp_path, use_vllm=True, vllm_mode="server", learning_rate=0.2, max_steps=3)
    failure = {
        "drop": "weight sync at step 1: .* the gap right after the first push",
        "garble": "weight sync at step 0: .* above 0.2 at the first push",
    }
    with vllm_standin(model_path=maze_model):
        trainer = EPOTrainer(maze_model, [episode_return_reward], args=args, train_dataset=task_dataset(factory),
                             rollout_func=rollout)  # fmt: skip
        with pytest.raises(StaleEngineError, match=failure[fault]):
            trainer.train()
        rollout.close()
    check = trainer.vllm_sync_check
    if fault == "drop":
        assert check.diffs[0] < 1e-5 and check.ratios[0] < 0.01  # a float64 engine against the fp32 trainer
        # measured: a gap of 0.51 nats after one step at lr 0.2, all of the trainer's move, so the ratio is
        # 1 / MOVE_SHARE = 100 (the reference floored at 1% of the move)
        assert check.diffs[1] > 0.3 and check.ratios[1] == pytest.approx(100, rel=0.05), check.ratios
    else:
        assert len(check.diffs) == 1 and check.diffs[0] > 5  # measured 19.3 nats: another, far sharper model


def test_one_default_sync_tolerance_for_every_precision(tmp_path):
    from epo_trl.trainers.epo import EPOConfig
    from epo_trl.trainers.vllm_sync import gap_ratio, sync_tolerance

    base = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none"}
    # the statistic is relative to the gap right after the first push, which holds each precision's own kernel noise
    assert sync_tolerance(EPOConfig(**base, bf16=False)) == sync_tolerance(EPOConfig(**base, bf16=True)) == 3.3
    assert sync_tolerance(EPOConfig(**base, bf16=True, vllm_sync_tolerance=5.0)) == 5.0
    assert gap_ratio(0.0387, 0.0366) == pytest.approx(1.057, abs=1e-3)  # SmolLM2 bf16, a correct push
    assert gap_ratio(0.378, 0.0366) == pytest.approx(10.33, abs=1e-2)  # the same, one step behind (no-op push)
    assert gap_ratio(1e-7, 1e-7) == pytest.approx(1e-4)  # fp32: gaps below GAP_FLOOR (1e-3 nats) count as it
