"""AEPO: hand-computed math, real tiny-model training (single- and multi-turn), entropy direction, resume, DDP.

Run as a script (under `accelerate launch`), this file is also the 2-process worker of `test_two_ranks_*`.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import (  # noqa: E402
    TRL_FORWARD,
    assert_trains_like,
    length_reward,
    prompt_dataset,
    scripted_rollout,
    tiny_args,
    train_recorded,
)
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from epo_trl import AEPOConfig, AEPOTrainer
from epo_trl.trainers.aepo.aepo_math import (
    choose_temperature,
    group_advantages,
    reinforce_sum,
    rows_per_micro_batch,
    sampled_entropy_sums,
    select_kept,
    share_cap,
)

HERE = os.path.dirname(__file__)


def _args(out, cls=AEPOConfig, **kw):
    if cls is AEPOConfig:
        kw = {"aepo_resample_share": 1.0, **kw}
    return tiny_args(cls, out, **kw)


_dataset = prompt_dataset


def char_reward(completions, **kwargs):
    """A reward with plenty of spread inside a group and no link to entropy."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def _logs(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


# --- pure math, hand-computed --------------------------------------------------------------------------
def test_temperature_choice_both_sides_and_step_zero():
    assert choose_temperature(None, 0.5, 1.2, 0.8) == 1.2  # step 0 counts as H = 0
    assert choose_temperature(0.3, 0.5, 1.2, 0.8) == 1.2
    assert choose_temperature(0.5, 0.5, 1.2, 0.8) == 1.2  # H <= H*
    assert choose_temperature(0.51, 0.5, 1.2, 0.8) == 0.8


def test_selection_by_advantage_threshold_and_cap():
    rewards = torch.tensor([1, 0, 0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 3, 1, math.nan, 1, 1], dtype=torch.float)
    adv = group_advantages(rewards, 5)
    # group means 0.4, 1.0, 0.4 and 1.5 (the NaN row is left out of its group's mean)
    expected = [
        0.6,
        -0.4,
        -0.4,
        0.6,
        -0.4,
        0,
        0,
        0,
        0,
        0,
        -0.4,
        -0.4,
        -0.4,
        -0.4,
        1.6,
        1.5,
        -0.5,
        math.nan,
        -0.5,
        -0.5,
    ]
    torch.testing.assert_close(adv, torch.tensor(expected), equal_nan=True)
    assert select_kept(adv, 0.05).tolist() == [0, 3, 14, 15]  # the all-equal group keeps none, NaN never
    assert select_kept(adv, 0.7).tolist() == [14, 15]
    eligible = torch.ones(20, dtype=torch.bool)
    eligible[3] = False  # e.g. a truncated completion
    assert select_kept(adv, 0.05, eligible).tolist() == [0, 14, 15]
    # a global cap shared over ranks by water-filling; the remainder goes to the lowest ranks
    assert share_cap([4], 2) == [2]
    assert share_cap([5, 1, 3], 6) == [3, 1, 2]
    assert share_cap([2, 3], 60) == [2, 3]
    assert share_cap([0, 0], 5) == [0, 0]
    assert share_cap([7, 7, 7], 0) == [0, 0, 0]
    assert rows_per_micro_batch(5, 2) == 3 and rows_per_micro_batch(0, 4) == 0
    with pytest.raises(ValueError, match="aepo_num_resamples"):
        group_advantages(torch.zeros(7), 5)


def test_reinforce_term_value_and_gradient_by_hand():
    # One-layer toy: logits z (3 positions x 4 tokens); L_reg = -mean over masked positions of log softmax(z)[o].
    z = torch.tensor([[0.0, 0, 0, 0], [math.log(3), 0, 0, 0], [5.0, 1, 2, 3]], requires_grad=True)
    tokens = torch.tensor([2, 0, 1])
    mask = torch.tensor([1.0, 1.0, 0.0])
    logps = torch.log_softmax(z, -1).gather(1, tokens[:, None]).squeeze(1)
    loss = reinforce_sum(logps, mask) / mask.sum()
    # -(log 1/4 + log 1/2) / 2 = 1.5 ln 2
    assert loss.item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    loss.backward()
    # (softmax - onehot) / 2 on the two kept positions, 0 on the masked one
    expected = torch.tensor(
        [[0.125, 0.125, -0.375, 0.125], [(0.5 - 1) / 2, 1 / 12, 1 / 12, 1 / 12], [0.0, 0.0, 0.0, 0.0]]
    )
    torch.testing.assert_close(z.grad, expected)


def test_sampled_entropy_estimator_by_hand():
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    total, count = sampled_entropy_sums(logps, mask).tolist()
    assert (total, count) == (6.0, 3.0)  # H ~ 6 / 3 = 2 nats


# --- the trainer's term: value, gradient, temperature-1 log-probs, micro-batch split --------------------
def test_term_over_a_step_equals_alpha_times_l_reg(tiny_model, tmp_path):
    trainer = AEPOTrainer(tiny_model, length_reward, args=_args(tmp_path, aepo_coef=0.3), train_dataset=_dataset())
    tok = trainer.processing_class
    prompt = torch.tensor([tok("look")["input_ids"]] * 3)
    completion = torch.tensor([tok(t)["input_ids"] for t in (" go north key", " open door key", " take the box")])
    loss_mask = torch.ones_like(completion, dtype=torch.float)
    loss_mask[1, 2:] = 0  # an env-observation / padded tail
    loss_mask[2] = 0  # a weight-0 padding row (a rank with fewer kept samples)
    trainer._aepo_active = {
        "rows": 3,
        "prompt_ids": prompt,
        "prompt_mask": torch.ones_like(prompt),
        "completion_ids": completion,
        "completion_mask": torch.ones_like(completion),
        "loss_mask": loss_mask,
        "num_tokens": loss_mask.sum().item(),
    }
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 2  # rows split 2 + 1 over the two micro-batches
    total = trainer._aepo_term(model, 0) + trainer._aepo_term(model, 1)
    assert trainer._aepo_term(model, 2) == 0.0
    grads = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)

    # By hand: plain logits (temperature 1), log-softmax, token mean over the kept tokens, times alpha.
    ids = torch.cat([prompt, completion], 1)
    logits = model(input_ids=ids).logits[:, prompt.size(1) - 1 : -1]
    logps = torch.log_softmax(logits.float(), -1).gather(2, completion[..., None]).squeeze(-1)
    manual = 0.3 * -(logps * loss_mask).sum() / loss_mask.sum()
    manual_grads = torch.autograd.grad(manual, list(model.parameters()), allow_unused=True)
    assert total.item() == pytest.approx(manual.item(), rel=1e-5)
    for g, m in zip(grads, manual_grads):
        if m is not None:
            torch.testing.assert_close(g, m, rtol=1e-4, atol=1e-6)


def test_sampling_context_sets_and_restores_the_temperature(tiny_model, tmp_path):
    from epo_trl.trainers.grpo.resampling import _sampling

    trainer = AEPOTrainer(tiny_model, length_reward, args=_args(tmp_path), train_dataset=_dataset())
    trainer._metrics["train"]["reward"].append(1.0)
    with _sampling(trainer, 1.7, 5):  # what `sample_more` runs in
        assert trainer.temperature == 1.7 and trainer.num_generations == 5
        assert trainer.generation_config.temperature == 1.7 and trainer.generation_kwargs["temperature"] == 1.7
        trainer._metrics["train"]["reward"].append(9.0)  # re-sample metrics stay out of TRL's
        trainer._metrics["train"]["completions/mean_length"].append(3.0)
    assert trainer.temperature == 1.0 and trainer.num_generations == 4
    assert trainer.generation_config.temperature == 1.0 and trainer.generation_kwargs["temperature"] == 1.0
    assert dict(trainer._metrics["train"]) == {"reward": [1.0]}


# --- real training -------------------------------------------------------------------------------------
def test_coef_zero_is_exactly_grpo(tiny_model, tmp_path):
    grpo = train_recorded(
        lambda: GRPOTrainer(
            tiny_model, length_reward, args=_args(tmp_path / "g", GRPOConfig), train_dataset=_dataset()
        )
    )
    aepo = train_recorded(
        lambda: AEPOTrainer(
            tiny_model,
            length_reward,
            args=_args(tmp_path / "a", aepo_coef=0.0, **TRL_FORWARD),
            train_dataset=_dataset(),
        )
    )
    assert_trains_like(grpo, aepo, atol=1e-7)
    assert not _logs(aepo[0], "aepo/kept")


def test_single_turn_run_keeps_samples_and_logs_metrics(tiny_model, tmp_path):
    trainer = AEPOTrainer(
        tiny_model,
        char_reward,
        args=_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, aepo_target_entropy=3.0),
        train_dataset=_dataset(),
    )
    trainer.train()
    temps = _logs(trainer, "aepo/temperature")
    assert len(temps) == 3 and temps[0] == 1.2  # step 0: no measurement yet, H = 0 -> T_high
    entropy = _logs(trainer, "aepo/entropy")
    assert len(entropy) == 2  # measured from the second step on
    for h, t in zip(entropy, temps[1:]):
        assert t == (1.2 if h <= 3.0 else 0.8)
    # H = the previous step's global token-mean entropy (single-turn: EPO's turn-0 mean)
    assert entropy == pytest.approx(_logs(trainer, "epo/turn_entropy/0")[:2], rel=1e-6)
    assert _logs(trainer, "aepo/entropy_minus_target") == pytest.approx([h - 3.0 for h in entropy])
    kept, reg = _logs(trainer, "aepo/kept"), _logs(trainer, "aepo/reg_loss")
    assert len(reg) == 3 and sum(kept) > 0
    assert all((r > 0) == (k > 0) for k, r in zip(kept, reg))  # -log pi > 0 whenever samples were kept
    assert all(k <= c for k, c in zip(kept, _logs(trainer, "aepo/candidates")))
    assert _logs(trainer, "completions/mean_length")  # TRL's own metrics are still there, unpolluted
    assert len(_logs(trainer, "reward")) == 3


def test_zero_kept_samples_is_a_logged_zero(tiny_model, tmp_path):
    trainer = AEPOTrainer(
        tiny_model, length_reward, args=_args(tmp_path, aepo_advantage_threshold=1e9), train_dataset=_dataset()
    )
    trainer.train()
    assert _logs(trainer, "aepo/kept") == [0.0, 0.0]
    assert _logs(trainer, "aepo/reg_loss") == [0.0, 0.0]


def test_multi_turn_rollout_resamples_whole_episodes_at_temperature(tiny_model, tmp_path):
    calls = []
    base = scripted_rollout(num_turns=3)

    def rollout(prompts, trainer):
        calls.append((len(prompts), trainer.temperature))
        return base(prompts, trainer)

    trainer = AEPOTrainer(
        tiny_model,
        length_reward,
        args=_args(tmp_path, max_steps=2, aepo_num_resamples=6, aepo_target_entropy=1.0),
        train_dataset=_dataset(),
        rollout_func=rollout,
    )
    trainer.train()
    # each step: the normal rollout (4 rows at T=1), then 1 distinct prompt x 6 episodes at T
    # (step 0: T_high; step 1: the tiny model's ~6-nat entropy is above H* = 1 -> T_low)
    assert calls == [(4, 1.0), (6, 1.2), (4, 1.0), (6, 0.8)]
    assert trainer.temperature == 1.0
    assert _logs(trainer, "aepo/temperature") == [1.2, 0.8]
    assert min(_logs(trainer, "aepo/kept")) > 0
    assert all(r > 0 for r in _logs(trainer, "aepo/reg_loss"))
    assert _logs(trainer, "epo/num_turns") == [3.0, 3.0]


def test_vllm_path_samples_at_temperature(tiny_model, tmp_path):
    """Single-turn with vLLM: the re-samples go through TRL's `_generate_single_turn` -> vLLM at T, n per prompt."""

    class SpyVLLM:  # `VLLMGeneration.generate`'s signature and return shapes; reads its own `temperature`
        temperature = 1.0

        def __init__(self, eos):
            self.calls, self.eos = [], eos

        def sync_weights(self):
            pass

        def generate(self, prompts, images, num_generations, profiler=None):
            self.calls.append((len(prompts), num_generations, self.temperature))
            completions = [[7 + i % 3] * (1 + i % 4) + [self.eos] for i in range(len(prompts))]
            return prompts, completions, [[[-0.5]] * len(c) for c in completions], None

    trainer = AEPOTrainer(tiny_model, length_reward, args=_args(tmp_path, max_steps=1), train_dataset=_dataset())
    spy = SpyVLLM(trainer.eos_token_ids[0])
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, spy, -1
    trainer.vllm_importance_sampling_correction = False
    trainer.train()
    assert spy.calls == [(4, 4, 1.0), (5, 5, 1.2)]  # 1 distinct prompt x n=5 at T_high, then restored
    assert spy.temperature == 1.0 and trainer.num_generations == 4
    assert _logs(trainer, "aepo/kept")[0] > 0


def test_real_rollout_engine_plays_regularisation_episodes_at_temperature(tmp_path, monkeypatch):
    """TrajectoryRollout on the maze env with HF generate: the re-sampled episodes are played at T."""
    from epo_trl.envs import task_dataset
    from epo_trl.envs.maze import MazeFactory
    from epo_trl.models.tiny import build_tiny_model, build_tokenizer, words_of
    from epo_trl.rollout import HFBackend, PromptBuilder, RolloutConfig, TrajectoryRollout, episode_return_reward

    words = [*MazeFactory().vocabulary(), *words_of(PromptBuilder(build_tokenizer(), "header").vocabulary_texts())]
    model = build_tiny_model(str(tmp_path / "model"), extra_words=words)
    temperatures = []
    generate = HFBackend.generate

    def spy(self, prompts, max_new_tokens, temperature=None):
        temperatures.append((len(prompts), self.temperature if temperature is None else temperature))
        return generate(self, prompts, max_new_tokens, temperature)

    monkeypatch.setattr(HFBackend, "generate", spy)
    factory = MazeFactory(size=2, task="reach")
    trainer = AEPOTrainer(
        model,
        episode_return_reward,
        args=_args(tmp_path / "out", max_steps=1, max_completion_length=8, aepo_num_resamples=4),
        train_dataset=task_dataset(factory),
        rollout_func=TrajectoryRollout(factory, RolloutConfig(max_turns=2, max_turn_tokens=8)),
    )
    trainer.train()
    # first turn of the normal rollout: 4 episodes at T=1; first turn of the re-sample: 1 task x 4 at T_high
    assert temperatures[0] == (4, 1.0)
    assert (4, 1.2) in temperatures[1:]
    assert {t for _, t in temperatures} == {1.0, 1.2}
    assert _logs(trainer, "aepo/temperature") == [1.2]
    assert len(_logs(trainer, "aepo/reg_loss")) == 1
    assert len(_logs(trainer, "rollout/success_rate")) == 1  # the re-sample's rollout metrics stay out


def test_sampled_estimator_drives_the_choice(tiny_model, tmp_path):
    trainer = AEPOTrainer(
        tiny_model,
        length_reward,
        args=_args(tmp_path, aepo_entropy_estimator="sampled", aepo_target_entropy=100.0),
        train_dataset=_dataset(),
        rollout_func=scripted_rollout(),
    )
    trainer.train()
    # -log pi of the sampled tokens of a near-uniform tiny model: a few nats, below the 100-nat target
    assert 1.0 < trainer.aepo_sampled_entropy < 10.0
    assert len(_logs(trainer, "aepo/entropy")) == 1  # measured after step 1 only
    assert _logs(trainer, "aepo/temperature") == [1.2, 1.2]


@pytest.mark.slow
def test_entropy_moves_toward_targets_above_and_below(tiny_model, tmp_path):
    """Three runs that differ only in H* and alpha: AEPO with H* far above the start (T_high), AEPO with H* far
    below it (T_low), and the control: the same run with AEPO off (alpha = 0, which is exactly GRPO).

    The control rules out that GRPO's own updates (random reward, same seed, same batches) move the entropy: without
    it, "below lowers entropy" would also pass with an AEPO term that does nothing, since GRPO can lower entropy on
    its own (under this test's former set-up, Adam at lr 1e-2 over four prompts, the alpha = 0 run ended at 0.66 nats,
    below the H* = 1e-3 AEPO run's 1.23). So each AEPO run must end measurably closer to its H* than the control.

    Set-up choices that make the comparison meaningful: the tiny model's logits are scaled up (final norm x 25) so it
    starts at ~2 nats, with room both ways; plain SGD without clipping, so a step is proportional to the gradient and
    alpha weighs the AEPO term (Adam rescales every step to the same size, whatever the loss); one prompt, so the
    distribution AEPO re-samples is the one the next step's entropy is measured on.
    Measured over seeds 1-5 and 7 (mean entropy of the last 3 of 8 steps, nats): control 1.98-2.17, below 0.00-0.10,
    above 2.61-3.88 (smallest distance to the control: 1.93 below, 0.61 above).
    """
    sharp = str(tmp_path / "sharp")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.mul_(25.0)
    model.save_pretrained(sharp)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(sharp)
    ends = {}
    for name, target, coef in (("above", 1e3, 5.0), ("below", 1e-3, 5.0), ("control", 1e-3, 0.0)):
        torch.manual_seed(0)
        args = _args(
            tmp_path / name,
            max_steps=8,
            optim="sgd",
            max_grad_norm=0.0,  # no clipping
            learning_rate=1e-3,
            aepo_target_entropy=target,
            aepo_coef=coef,
            aepo_temperature_high=2.0,
            aepo_temperature_low=0.5,
            aepo_num_resamples=8,
            aepo_advantage_threshold=0.0,
        )
        one_prompt = Dataset.from_dict({"prompt": ["go north"] * 32})
        trainer = AEPOTrainer(sharp, char_reward, args=args, train_dataset=one_prompt)
        trainer.train()
        entropy = _logs(trainer, "entropy")  # full-vocabulary entropy of each step's batch, before its update
        assert len(entropy) == 8
        ends[name] = (entropy[0], sum(entropy[-3:]) / 3)
        if coef == 0:
            assert not _logs(trainer, "aepo/kept")  # the control really ran without AEPO's term
    print("entropy (initial, mean of the last 3 steps):", ends)
    assert ends["below"][0] == pytest.approx(ends["above"][0])  # same start: the runs differ only after step 0
    assert ends["control"][0] == pytest.approx(ends["above"][0])
    assert ends["above"][1] - ends["above"][0] > 0
    assert ends["below"][1] - ends["below"][0] < 0
    # closer to H* than GRPO alone, by margins well inside the measured ones (1.93 and 0.61 nats)
    assert ends["below"][1] < ends["control"][1] - 1.0
    assert ends["above"][1] > ends["control"][1] + 0.3


def test_checkpoint_resume_restores_the_aepo_state(tiny_model, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, aepo_target_entropy=6.17, aepo_coef=0.5)

    def make(out):
        return AEPOTrainer(
            tiny_model,
            length_reward,
            args=_args(out, **common),
            train_dataset=_dataset(),
            rollout_func=scripted_rollout(),
        )

    full = make(tmp_path / "full")
    full.train()
    with open(tmp_path / "full" / "checkpoint-2" / "epo_state.json") as f:
        saved = json.load(f)
    assert saved["last_step_entropy"] is not None and saved["aepo"]["sampled_entropy"] is None
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))

    assert resumed.state_for_checkpoint() == full.state_for_checkpoint()

    def by_step(trainer, key):
        return {h["step"]: h[key] for h in trainer.state.log_history if key in h and h["step"] > 2}

    assert set(by_step(resumed, "loss")) == set(by_step(full, "aepo/temperature")) == {3, 4}
    # the restored entropy picks the same temperature at step 3 as the uninterrupted run
    assert by_step(resumed, "aepo/temperature") == by_step(full, "aepo/temperature")
    assert by_step(resumed, "aepo/entropy") == pytest.approx(by_step(full, "aepo/entropy"), rel=1e-6)
    for key in ("loss", "aepo/reg_loss"):
        assert by_step(resumed, key) == pytest.approx(by_step(full, key), rel=1e-5, abs=1e-7)
    # an EPO (or GRPO) checkpoint (no AEPO state) is refused with a hint
    with pytest.raises(ValueError, match="AEPOTrainer checkpoint"):
        resumed.load_checkpoint_state({"last_step_entropy": 1.0, "entropy_history": {}})


@pytest.mark.parametrize(
    "field,value",
    [
        ("aepo_target_entropy", 0.0),
        ("aepo_temperature_high", 1.0),
        ("aepo_temperature_low", 1.0),
        ("aepo_temperature_low", 0.0),
        ("aepo_coef", -0.1),
        ("aepo_resample_share", 0.0),
        ("aepo_resample_share", 1.5),
        ("aepo_num_resamples", 1),
        ("aepo_advantage_threshold", -0.1),
        ("aepo_max_kept", 0),
        ("aepo_max_kept_above_target", -1),
        ("aepo_entropy_estimator", "exact"),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        AEPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **{field: value})


def test_defaults_turn_epo_off(tmp_path):
    args = AEPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert (args.entropy_coef, hasattr(args, "smoothing"), args.aepo_coef) == (0.0, False, 0.02)


# --- two processes -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_stay_in_lockstep_when_one_keeps_nothing(tiny_model, tmp_path):
    """DDP on 2 CPU processes: rank 1's rewards are constant (it never keeps a sample) and must not deadlock;
    both ranks hold the same AEPO state and the same weights."""
    from scripts.epo_steps import free_port

    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
        os.path.abspath(__file__), tiny_model, str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads(Path(tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-6)
    assert ranks[0]["local_kept"] and all(k > 0 for k in ranks[0]["local_kept"])
    assert ranks[1]["local_kept"] and all(k == 0 for k in ranks[1]["local_kept"])
    assert ranks[0]["kept"] == ranks[1]["kept"] == ranks[0]["local_kept"]  # global = rank 0's alone
    assert all(r > 0 for r in ranks[0]["reg_loss"])


def _ddp_worker(model_path: str, out: str) -> None:
    local_kept = []

    def reward(completions, trainer_state=None, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        return [float(len(c) % 5) if rank == 0 else 1.0 for c in completions]

    class Trainer(AEPOTrainer):
        def _aepo_regularisation_batch(self, inputs):
            batch = super()._aepo_regularisation_batch(inputs)
            local_kept.append(float(batch["loss_mask"].amax(dim=1).sum().item()) if batch["rows"] else 0.0)
            return batch

    args = _args(
        out,
        max_steps=3,
        gradient_accumulation_steps=2,
        aepo_num_resamples=4,
        aepo_coef=0.5,
        logging_steps=1,
    )
    ds = Dataset.from_dict({"prompt": [f"go north {i}" for i in range(32)]})
    trainer = Trainer(model_path, reward, args=args, train_dataset=ds, rollout_func=scripted_rollout())
    trainer.train()
    rank = trainer.accelerator.process_index
    weights = [p.detach().double().sum().item() for p in trainer.model.parameters()]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "world": trainer.accelerator.num_processes,
                "state": trainer.state_for_checkpoint(),
                "weights": weights,
                "local_kept": local_kept,
                "kept": _logs(trainer, "aepo/kept"),
                "reg_loss": _logs(trainer, "aepo/reg_loss"),
            },
            f,
        )


if __name__ == "__main__":
    from epo_trl.distributed import destroy_process_group

    _ddp_worker(sys.argv[1], sys.argv[2])
    destroy_process_group()  # every rank gets here: no live process group at interpreter exit


def test_step_mode_keeps_every_turn_of_the_above_mean_episodes(tiny_model, tmp_path):
    """Step-mode rollout (one row per turn): AEPO re-samples whole episodes at T and keeps the turn rows of the
    episodes whose return beats their group's mean; L_reg is checked against a plain HF forward (lr 0: the weights
    the step trains on are the ones the test reads)."""
    from countdown_env import CountdownFactory

    from epo_trl.envs.protocol import TaskSpec
    from epo_trl.rollout import CallableBackend, RolloutConfig, StepRollout

    tok = AutoTokenizer.from_pretrained(tiny_model)
    good = tok("<action> go </action>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    bad = tok("no", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    calls = []

    def policy(prompts, max_new_tokens, temperature):
        # the normal rollout (T = 1) always counts down; in a re-sampled group of 4 lockstep episodes, members 2 and 3
        # answer turn 0 with an invalid action
        calls.append((len(prompts), temperature))
        first_resample_turn = temperature != 1.0 and (len(calls) < 2 or calls[-2][1] == 1.0)
        return [bad if first_resample_turn and i >= 2 else good for i in range(len(prompts))]

    rollout = StepRollout(CountdownFactory(), RolloutConfig(max_turns=4, max_turn_tokens=12), CallableBackend(policy))
    key = TaskSpec("countdown", "count", 2, 0).key()  # won after 2 valid actions
    trainer = AEPOTrainer(
        tiny_model,
        length_reward,  # unused in step mode: rows are scored by their episode's return
        args=_args(tmp_path, max_steps=1, learning_rate=0.0, aepo_num_resamples=4, aepo_advantage_threshold=0.01),
        train_dataset=Dataset.from_dict({"prompt": [key] * 8}),
        rollout_func=rollout,
    )
    trainer.train()
    # normal batch: 4 episodes x 2 turns at T = 1; re-samples: 4 episodes at T_high (step 0), the two that wasted
    # turn 0 play 3 turns
    assert calls == [(4, 1.0), (4, 1.0), (4, 1.2), (4, 1.2), (2, 1.2)]
    # returns 10, 10, 9.9, 9.9 (win 10, invalid -0.1): advantages +-0.05 > 0.01 for the first two -> their 2 x 2 turns
    assert _logs(trainer, "aepo/candidates") == [4.0] and _logs(trainer, "aepo/kept") == [4.0]
    batch = trainer._aepo_active
    assert batch["rows"] == 4
    assert [row[m.bool()].tolist() for row, m in zip(batch["completion_ids"], batch["loss_mask"])] == [good] * 4
    # turn 0 and turn 1 prompts of each winning episode: "count 2", then "count 1"
    prompts = [tok.decode(p[m.bool()]) for p, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
    assert ["count 2" in p and "count 1" not in p for p in prompts] == [True, False, True, False]
    assert all("count 1" in p for p in prompts[1::2])
    # (A4) L_reg = - token mean of log pi(good) over the 4 rows, by a forward of the untouched model
    model = AutoModelForCausalLM.from_pretrained(tiny_model).float().eval()
    total, count = 0.0, 0
    for p, m in zip(batch["prompt_ids"], batch["prompt_mask"]):
        ids = torch.tensor([p[m.bool()].tolist() + good])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        start = ids.size(1) - len(good)
        total -= sum(logp[start - 1 + j, tok_id].item() for j, tok_id in enumerate(good))
        count += len(good)
    assert _logs(trainer, "aepo/reg_loss")[0] == pytest.approx(total / count, rel=1e-4)
