"""Shared-prefix forwards (`share_prompt_forward`, epo_trl/trainers/grpo/prefix_forward.py) change no number.

Rows that share a prompt run it once (a prefix pass, its keys/values expanded to the rows, then a pass over each
row's completion). Checked against TRL's own forward (`GRPOTrainer._get_per_token_logps_and_entropies`, the fused
LM head TRL patches in) on a hand-built batch at fp32: groups of rows sharing left-padded prompts in shuffled order,
right-padded completions of different lengths, a forward chunk whose rows share nothing: same log-probs, entropies
and gradients of a loss over both, for tied and untied Llama-style models and a Qwen2; then an EPO trainer trained
three steps with sharing on and off, in trajectory and step mode: same losses, gradients and logged metrics.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from test_old_logp_skip import STEPS, _assert_same, _train
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from epo_trl.trainers.grpo import prefix_forward

PAD = 0
PROMPTS = {"a": [5, 6, 7, 8, 9], "b": [11, 12, 13, 14, 15, 16, 17], "c": [21, 22, 23]}
# (prompt, completion): group a x3, group b x2 and a lone c, interleaved as after TRL's shuffle
ROWS = [("a", [30, 31, 32]), ("b", [33, 34, 35, 36, 37, 38]), ("a", [39]), ("c", [40, 41, 42, 43]),
        ("b", [44, 45]), ("a", [46, 47, 48, 49, 50])]  # fmt: skip


def _batch(rows):
    """(input_ids, attention_mask, logits_to_keep): prompts left-padded, completions right-padded, as TRL builds."""
    width = max(len(PROMPTS[p]) for p, _ in rows)
    keep = max(len(c) for _, c in rows)
    ids, mask = [], []
    for p, c in rows:
        prompt, left, right = PROMPTS[p], width - len(PROMPTS[p]), keep - len(c)
        ids.append([PAD] * left + prompt + c + [PAD] * right)
        mask.append([0] * left + [1] * (len(prompt) + len(c)) + [0] * right)
    return torch.tensor(ids), torch.tensor(mask), keep


def _model(family: str, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    model = model_cls(config_cls(**shape, attn_implementation="sdpa")).float()
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))  # as GRPOTrainer.__init__ does
    return model


def _trl_forward(model, ids, mask, keep, batch_size):
    """TRL's own chunked forward (the owner's accelerator only supplies autocast, none at fp32, and a rank for
    TRL's profiler)."""
    accelerator = types.SimpleNamespace(autocast=contextlib.nullcontext, is_main_process=True)
    owner = types.SimpleNamespace(accelerator=accelerator)
    out = GRPOTrainer._get_per_token_logps_and_entropies(
        owner, model, ids, mask, keep, batch_size=batch_size, compute_entropy=True
    )
    return out[0], out[1]


def _shared_forward(model, ids, mask, keep, batch_size, plain_calls):
    def plain(i, m):
        plain_calls.append(i.size(0))
        return _trl_forward(model, i, m, keep, None)

    return prefix_forward.per_token_logps(model, model.base_model, ids, mask, keep, batch_size, True, plain)


def _loss_and_grads(model, logps, entropies, mask, keep):
    """A loss over both outputs (advantage-weighted log-probs plus an entropy bonus) and every parameter's gradient."""
    model.zero_grad()
    completion = mask[:, -keep:].float()
    weights = torch.linspace(-1.0, 1.0, logps.numel()).view_as(logps)
    loss = ((weights * logps - 0.1 * entropies) * completion).sum() / completion.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "family, tied, checkpointing",
    [("llama", True, False), ("llama", False, False), ("qwen2", True, False), ("llama", False, True)],
)
@pytest.mark.parametrize("batch_size", [None, 3])  # one chunk; chunks of 3 rows
def test_shared_prefix_forward_equals_trls_forward(family, tied, checkpointing, batch_size):
    model = _model(family, tied)
    if checkpointing:  # transformers' default (non-reentrant): checkpointed layers rerun in the backward
        model.gradient_checkpointing_enable()
        model.train()
    rows = ROWS if batch_size is None else [ROWS[0], ROWS[1], ROWS[3], ROWS[2]]  # a, b, c, a
    ids, mask, keep = _batch(rows)
    want_logps, want_entropies = _trl_forward(model, ids, mask, keep, batch_size)
    want_loss, want_grads = _loss_and_grads(model, want_logps, want_entropies, mask, keep)
    plain_calls = []
    logps, entropies, tokens = _shared_forward(model, ids, mask, keep, batch_size, plain_calls)
    loss, grads = _loss_and_grads(model, logps, entropies, mask, keep)

    completion = mask[:, -keep:].bool()  # TRL's outputs are 0 off the completion tokens; so are these
    torch.testing.assert_close(logps, want_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropies, want_entropies, rtol=0, atol=1e-5)
    assert (logps[~completion] == 0).all() and (want_logps[completion] < 0).all()
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-6)
    assert grads.keys() == want_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Fewer positions run: each shared prompt (minus its last token) once. One chunk: 3 unique prompts of width 7
    # -> 3 * 6 + 6 rows * 7 (last prompt token + 6 completion positions) = 60 instead of 6 * 13 = 78. Chunks of 3 of
    # rows a, b, c, a: grouped by prompt first (c, a, a | b), so both a rows share one chunk (2 * 6 + 3 * 7 = 33) and
    # b runs alone on TRL's forward (13); in the given order (a, b, c | a) no chunk would share a prompt.
    assert (tokens, plain_calls) == ((60, []) if batch_size is None else (33 + 13, [1]))


def test_no_shared_prompt_runs_trls_forward():
    ids, mask, keep = _batch([ROWS[0], ROWS[1], ROWS[3]])
    assert prefix_forward.prompt_groups(ids, mask, keep) is None
    assert prefix_forward.prompt_groups(ids[:1].repeat(3, 1), mask[:1].repeat(3, 1), ids.size(1) - 1) is None
    first, inverse = prefix_forward.prompt_groups(*_batch(ROWS))
    assert inverse[first].tolist() == list(range(3)) and sorted(first.tolist()) == [0, 1, 3]  # first row of a, b, c
    assert [inverse[i] == inverse[j] for i, j in [(0, 2), (0, 5), (1, 4), (0, 3)]] == [True, True, True, False]
    ids, mask, keep = _batch(ROWS)
    order = prefix_forward.grouping_order(ids[:, :-keep], mask[:, :-keep])
    assert order.tolist() == [3, 0, 2, 5, 1, 4]  # c | a a a | b b: sorted prompts, each prompt's rows in their order
    # same prompt tokens, different padding: not the same prompt part (the mask is part of it)
    ids, mask, keep = _batch([ROWS[0], ROWS[2]])
    assert prefix_forward.prompt_groups(ids, torch.cat([mask[:1], mask[1:].roll(1)]), keep) is None


def test_models_it_cannot_be_exact_for_fall_back():
    from transformers import MistralConfig, MistralForCausalLM

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    assert "sliding-window" in prefix_forward.unsupported(MistralForCausalLM(MistralConfig(**shape)))
    model = _model("llama", True)
    assert prefix_forward.unsupported(model) is None
    model.gradient_checkpointing_enable({"use_reentrant": True})
    assert "reentrant gradient checkpointing" in prefix_forward.unsupported(model.train(), True)
    assert prefix_forward.unsupported(model.train(), False) is None  # non-reentrant: tested above
    assert prefix_forward.unsupported(model.eval(), True) is None  # TRL's no-grad passes run without checkpointing


@pytest.mark.parametrize("mode", ["trajectory", "step"])
def test_epo_trains_exactly_as_without_sharing(maze_model, tmp_path, mode):
    """Three EPO steps with sharing on vs off (TRL's forward): same losses, gradients at every step and logged
    metrics; the policy forwards ran fewer positions (every trajectory group shares its first prompt)."""
    # beta: a reference pass too. SGD, and the stand-in engine's exact sampling log-probs (not test_old_logp_skip's
    # perturbed ones, which amplify a log-prob's last bits 1000-fold): the two forwards round differently (~1e-8), and
    # Adam's first steps turn a gradient of that size into a step of lr either way, so only SGD keeps runs comparable.
    kw = dict(vllm_importance_sampling_mode="token_truncate", beta=0.01, optim="sgd")
    shared = _train(maze_model, tmp_path / "shared", mode, [], **kw)
    plain = _train(maze_model, tmp_path / "plain", mode, [], share_prompt_forward=False, **kw)
    _assert_same(shared, plain)
    assert len(shared[1]) == STEPS
    assert shared[0].forward_tokens < plain[0].forward_tokens


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sharing_on_two_ddp_ranks_trains_as_without(maze_model, tmp_path):
    """DDP: the prefix pass runs on the module under the DDP wrapper and the suffix pass through it; the gradients
    of both reach DDP's all-reduce once. Same weights and logs on 2 ranks, step mode with row chunks and a reference
    pass (tests/scripts/old_logp_skip_ddp.py)."""
    import json
    import os

    from scripts.epo_steps import accelerate_launch

    script = os.path.join(os.path.dirname(__file__), "scripts", "old_logp_skip_ddp.py")
    proc = accelerate_launch("multi_gpu", [script, maze_model, str(tmp_path), "share_prompt_forward"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    for rank in ranks:
        shared, plain = rank["runs"]["True"], rank["runs"]["False"]
        assert len(shared["logs"]) == STEPS and shared["weights"].keys() == plain["weights"].keys()
        for name, value in plain["weights"].items():
            assert shared["weights"][name] == pytest.approx(value, rel=1e-6, abs=1e-5), name
        for got, want in zip(shared["logs"], plain["logs"]):
            assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert ranks[0]["runs"] == ranks[1]["runs"]  # DDP: one model, metrics reduced over ranks
