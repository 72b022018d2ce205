"""Shared pieces of the trainer tests: tiny-run config, dataset, reward and a scripted multi-turn rollout."""

from datasets import Dataset

PROMPTS = ["go north", "take key", "open door", "look"]


# Our trainers' forward exactly as TRL's GRPOTrainer runs it, for runs compared with TRL's bit for bit: a shared
# prompt pass (`share_prompt_forward`, exact to float rounding: tests/test_shared_prefix.py) rounds ~1e-8 differently,
# and Adam's first steps turn a gradient difference of that size into a step of the learning rate.
TRL_FORWARD = {"share_prompt_forward": False}


def tiny_args(cls, out, **kw):
    """A small CPU training config of `cls` (GRPOConfig / EPOConfig / AEPOConfig) with `kw` overrides."""
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=12,
        max_steps=2,
        learning_rate=5e-2,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=7,
        disable_tqdm=True,
    )
    base.update(kw)
    return cls(**base)


def prompt_dataset(n=4):
    return Dataset.from_dict({"prompt": (PROMPTS * n)[: 4 * n]})


def length_reward(completions, **kwargs):
    return [float(len(c) % 5) for c in completions]


def scripted_rollout(num_turns=3):
    """A deterministic multi-turn rollout honouring TRL's rollout_func contract (env_mask 0 on obs tokens).

    Completion of prompt copy i: `num_turns` model turns separated by observation tokens; the action
    text depends on i so rewards vary inside a group.
    """

    def rollout(prompts, trainer):
        tok = trainer.processing_class
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": []}
        for i, prompt in enumerate(prompts):
            ids, mask = [], []
            for t in range(num_turns):
                action = tok(f" go north {i % 4}" + " key" * (i % 3))["input_ids"]
                ids += action
                mask += [1] * len(action)
                if t < num_turns - 1:
                    obs = tok(" observation room door")["input_ids"]
                    ids += obs
                    mask += [0] * len(obs)
            ids.append(tok.eos_token_id)
            mask.append(1)
            out["prompt_ids"].append(tok(prompt)["input_ids"])
            out["completion_ids"].append(ids)
            out["env_mask"].append(mask)
        return out

    return rollout


def step_mode_batch(tok, rows=5):
    """Hand-built step-mode micro-batch: rows of different lengths, each one turn with its turn index."""
    import torch

    texts = [" go north key", " open door", " take key go", " look", " go south door key"][:rows]
    ids = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    completion = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    prompt = torch.tensor([tok("look")["input_ids"] * 3] * rows)
    return {
        "prompt_ids": prompt,
        "prompt_mask": torch.ones_like(prompt),
        "completion_ids": completion,
        "completion_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "advantages": torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5][:rows]),
        "num_items_in_batch": torch.tensor(float(sum(map(len, ids)))),
        "turn_ids": torch.tensor([0, 1, 2, 1, 0][:rows]),
        "_epo_prepared": True,  # already a micro-batch: skip generation
    }


def train_recorded(make_trainer, seed=0):
    """Seed, build a trainer with `make_trainer()`, train it, and return (trainer, logged losses, the gradients of
    every optimizer step (after clipping, as the optimizer sees them))."""
    import torch
    from transformers import TrainerCallback

    grads = []

    class RecordGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    torch.manual_seed(seed)
    trainer = make_trainer()
    trainer.add_callback(RecordGradients())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses, grads


def assert_trains_like(reference, candidate, atol, steps=2):
    """`candidate` trains exactly as `reference` (both `train_recorded` results): the same logged loss, the same
    gradient at every optimizer step and the same final weights, to `atol`."""
    import pytest
    import torch

    (ref, ref_loss, ref_grads), (cand, cand_loss, cand_grads) = reference, candidate
    assert len(ref_loss) == steps and cand_loss == pytest.approx(ref_loss, rel=0, abs=atol)
    assert len(ref_grads) == len(cand_grads) == steps
    for step, (want, got) in enumerate(zip(ref_grads, cand_grads)):
        assert want.keys() == got.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=f"step {step}: grad of {name}")
    assert any(g.abs().max() > 0 for g in ref_grads[0].values())  # the steps did train
    weights = dict(cand.model.state_dict())
    for name, value in ref.model.state_dict().items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=atol, msg=name)


def trl_loss_types() -> list[str]:
    """The loss types TRL's GRPOConfig allows, read from its `loss_type` field ("Supported values are ...")."""
    import dataclasses
    import re

    from trl import GRPOConfig

    field = {f.name: f for f in dataclasses.fields(GRPOConfig)}["loss_type"]
    supported = re.search(r"Supported values are (.*?)\.\s", field.metadata["help"])
    assert supported, f"TRL's loss_type help no longer lists its values: {field.metadata['help'][:200]}"
    return re.findall(r"'(\w+)'", supported.group(1))
