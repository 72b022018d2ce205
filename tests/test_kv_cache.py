"""KV reuse across turns (epo_trl/rollout/backends/hf_kv_cache.py): HFBackend's samples and logprobs, far less prefill."""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from countdown_env import WORDS, CountdownFactory  # noqa: E402

from epo_trl.models.tiny import build_tiny_model, build_tokenizer, words_of  # noqa: E402
from epo_trl.rollout import HFBackend, PromptBuilder, RolloutConfig, RolloutEngine  # noqa: E402
from epo_trl.rollout.backends import backend_for_trainer  # noqa: E402
from epo_trl.rollout.backends.hf_kv_cache import KVCacheHFBackend  # noqa: E402

# Cached keys/values come from earlier forwards: equal to a full prefill up to float32 rounding.
LOGPROB_TOL = 1e-5


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    words = [*words_of(PromptBuilder(build_tokenizer(), "").vocabulary_texts()), *WORDS]
    path = build_tiny_model(
        str(tmp_path_factory.mktemp("tiny")), [*words, *words_of([CountdownFactory.prompt_header])], hidden_size=16
    )
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


class PromptLog:
    """Records the prompt lengths of every call."""

    def __init__(self, inner):
        self.inner, self.lockstep, self.eos_ids = inner, inner.lockstep, inner.eos_ids
        self.lengths: list[list[int]] = []

    def generate(self, prompts, max_new_tokens, temperature=None):
        self.lengths.append([len(p) for p in prompts])
        return self.inner.generate(prompts, max_new_tokens, temperature)


def play(backend, tokenizer, seed: int = 0):
    import torch

    factory = CountdownFactory()  # episodes end after 1..4 valid turns; invalid (empty) turns make them longer
    config = RolloutConfig(max_turns=6, max_turn_tokens=5, require_tags=False, num_workers=2)
    engine = RolloutEngine(factory, tokenizer, config)
    torch.manual_seed(seed)
    try:
        return engine.run(factory.tasks(), backend, "trajectory").episodes
    finally:
        engine.close()


def assert_same_turns(want, got):
    import torch

    assert [t.completion_ids for t in got] == [t.completion_ids for t in want]
    for a, b in zip(want, got):
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=LOGPROB_TOL, rtol=0)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_trajectory_rollout_samples_as_without_the_cache(model_and_tokenizer, batch_size):
    model, tokenizer = model_and_tokenizer
    plain = play(HFBackend(model, tokenizer, temperature=1.0, batch_size=batch_size), tokenizer)
    backend = KVCacheHFBackend(model, tokenizer, temperature=1.0, batch_size=batch_size)
    log = PromptLog(backend)
    cached = play(log, tokenizer)

    lengths = [len(e.turns) for e in cached]
    assert lengths == [len(e.turns) for e in plain] and len(set(lengths)) >= 3  # episodes end at different turns
    for want, got in zip(plain, cached):
        assert got.completion_ids == want.completion_ids and got.env_mask == want.env_mask
        assert_same_turns(want.turns, got.turns)
    # Every prompt token is either reused or prefilled; after the first turn, most come from the cache.
    total = sum(map(sum, log.lengths))
    assert backend.reused_tokens + backend.prefill_tokens == total
    first_turn = sum(log.lengths[0])
    assert backend.prefill_tokens - first_turn < 0.25 * (total - first_turn)


def test_lockstep_dummies_and_unknown_prompts_next_to_continuations(model_and_tokenizer):
    """Lockstep dummies repeat a first prompt (a prefix of a cached dummy row); an unknown prompt is prefilled."""
    import torch

    model, tokenizer = model_and_tokenizer
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    a, b, c = encode("count 3 reach zero"), encode("you count down"), encode("go go")
    obs = encode("ok count 2")

    def three_turns(backend):
        torch.manual_seed(1)
        out = [backend.generate([a, b, c], 4, 1.0)]
        ids = out[-1].completion_ids
        turn2 = [a + ids[0] + obs, c + ids[2] + obs, a, encode("won reach zero count down go")]
        out.append(backend.generate(turn2, 4, 1.0))
        out.append(backend.generate([turn2[1] + out[-1].completion_ids[1] + obs, a, a], 4, 1.0))
        return out

    want = three_turns(HFBackend(model, tokenizer, temperature=1.0))
    backend = KVCacheHFBackend(model, tokenizer, temperature=1.0)
    got = three_turns(backend)
    for x, y in zip(want, got):
        assert y.completion_ids == x.completion_ids
        assert_same_turns(
            [SimpleNamespace(completion_ids=ids, logprobs=lp) for ids, lp in zip(x.completion_ids, x.logprobs)],
            [SimpleNamespace(completion_ids=ids, logprobs=lp) for ids, lp in zip(y.completion_ids, y.logprobs)],
        )
    assert backend.reused_tokens > 0


def fake_trainer(model, tokenizer):
    return SimpleNamespace(
        model_wrapped=model,
        processing_class=tokenizer,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        accelerator=None,
        args=SimpleNamespace(ds3_gather_for_generation=True),
        generation_kwargs={},
        eos_token_ids=[tokenizer.eos_token_id],
        use_vllm=False,
        state=SimpleNamespace(global_step=0),
    )


def test_cache_never_outlives_a_weight_update(model_and_tokenizer):
    import torch

    model, tokenizer = model_and_tokenizer
    model = copy.deepcopy(model)
    trainer = fake_trainer(model, tokenizer)
    backend = backend_for_trainer(trainer)  # the trainer's HF backend reuses KV
    assert isinstance(backend, KVCacheHFBackend)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("count 3 reach zero", "go go down")]
    torch.manual_seed(0)
    turn1 = backend.generate(prompts, 4)
    turn2 = [p + c + prompts[0] for p, c in zip(prompts, turn1.completion_ids)]

    with torch.no_grad():  # an optimizer step
        for p in model.parameters():
            p.mul_(1.5)
    trainer.state.global_step = 1
    torch.manual_seed(0)
    got = backend.generate(turn2, 4)
    assert backend.reused_tokens == 0  # the cache built with the old weights was dropped
    torch.manual_seed(0)
    want = HFBackend.from_trainer(trainer).generate(turn2, 4)
    assert got.completion_ids == want.completion_ids
    torch.testing.assert_close(
        [torch.tensor(x) for x in got.logprobs], [torch.tensor(x) for x in want.logprobs], atol=LOGPROB_TOL, rtol=0
    )
