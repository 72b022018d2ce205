"""The vLLM stand-in honours TRL 1.16's contract, and our vLLM backend reads vLLM's outputs correctly.

The stand-in replaces only vLLM (`LLM`, `SamplingParams`) and TRL's HTTP client; the first test pins the TRL source
lines it relies on, so a TRL upgrade that changes them fails here instead of silently changing what is tested.
"""

from __future__ import annotations

import inspect
import os
from types import SimpleNamespace

import pytest
import torch
import trl
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer.grpo_trainer import GRPOTrainer
from vllm_standin import make_vllm_generation, model_checksums, vllm_standin

from epo_trl.models.tiny import build_tiny_model
from epo_trl.rollout import VLLMBackend
from epo_trl.rollout.backends.base import eos_token_ids
from epo_trl.rollout.backends.vllm import CPU_KV_CACHE_GIB, default_cpu_kv_cache, sampled_logprobs

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(str(tmp_path_factory.mktemp("standin")), hidden_size=16)
    return path, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_trl_source_still_matches_what_the_stand_in_emulates():
    assert trl.__version__.startswith("1.16."), "re-read TRL's VLLMGeneration and update tests/vllm_standin.py"
    generate = inspect.getsource(VLLMGeneration.generate)
    sync = inspect.getsource(VLLMGeneration.sync_weights)
    for line in (
        "self.llm.generate(vllm_prompts, sampling_params=sampling_params, use_tqdm=False)",
        "torch.distributed.all_gather_object(gathered_prompts, prompts, group=self.tp_group)",
        "tp_slice = slice(local_rank_in_group * orig_size, (local_rank_in_group + 1) * orig_size)",
        'if self.mode == "colocate" and self.enable_sleep_mode and self._llm_weights_sleeping:',
        "self.llm.sleep(level=2)",
        "all_prompts = gather_object(prompts)",
        "output = self.vllm_client.generate(",
        "all_logprobs, all_logprob_token_ids = extract_logprobs(all_outputs)",
    ):
        assert line in generate, line
    for line in (
        'self.llm.wake_up(tags=["weights"])',
        "self.vllm_client.update_named_params(self._weight_metadata, self._iter_named_params())",
        "model_runner.model.load_weights([(name, param)])",
        "self.llm.reset_prefix_cache()",
        "self.vllm_client.reset_prefix_cache()",
    ):
        assert line in sync, line
    # The trainer syncs once per optimizer step, and only inside _generate (step mode must do it itself).
    assert "self.state.global_step != self._last_loaded_step" in inspect.getsource(GRPOTrainer._generate)
    assert "logprobs=0," in inspect.getsource(GRPOTrainer.__init__)


def test_colocate_engine_samples_from_the_pushed_weights_with_exact_logprobs(tiny):
    path, model, tok = tiny
    with vllm_standin() as standin:
        vllm = make_vllm_generation(model, Accelerator(cpu=True), tok, mode="colocate", max_completion_length=5)
        (engine,) = standin.engines
        with torch.no_grad():  # vLLM loaded the checkpoint; training then moves the weights
            next(model.parameters()).add_(0.5)
        assert engine.synced == []
        vllm.sync_weights()
        assert engine.synced == [model_checksums(model)]
        vllm.temperature = 0.7
        prompt_ids, completions, logprobs, token_ids = vllm.generate(PROMPTS, None, 1)
    assert prompt_ids == PROMPTS and [len(c) for c in completions] == [len(lp) for lp in logprobs]
    # logprobs=0: one candidate per position, the sampled token, with the temperature-scaled log-probability
    for prompt, ids, lps, cand in zip(PROMPTS, completions, logprobs, token_ids):
        assert [c[0] for c in cand] == ids and all(len(lp) == 1 for lp in lps)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].double() / 0.7
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids).view(-1, 1)).squeeze(1)
        torch.testing.assert_close(
            torch.tensor([lp[0] for lp in lps], dtype=torch.float64), expected, atol=1e-5, rtol=0
        )


def test_sleep_mode_wakes_and_repushes_before_generating(tiny):
    _, model, tok = tiny
    with vllm_standin() as standin:
        vllm = make_vllm_generation(model, Accelerator(cpu=True), tok, mode="colocate", enable_sleep_mode=True)
        vllm.generate(PROMPTS[:1], None, 1)
        vllm.generate(PROMPTS[:1], None, 1)
    events = [e[0] for e in standin.engines[0].events if e[0] != "reset_prefix_cache"]
    cycle = ["wake_up", "sync", "wake_up", "generate", "sleep"]
    assert events == ["sleep", *cycle, *cycle]


def test_server_mode_announces_and_streams_every_tensor(tiny):
    path, model, tok = tiny
    with vllm_standin(model_path=path) as standin:
        vllm = make_vllm_generation(model, Accelerator(cpu=True), tok, mode="server", max_completion_length=4)
        vllm.sync_weights()
        _, completions, logprobs, _ = vllm.generate([p for p in PROMPTS for _ in range(2)], None, 2)
    (server,) = standin.engines
    assert server.synced == [model_checksums(model)]
    assert len(completions) == 6 and all(len(lp) == len(c) for lp, c in zip(logprobs, completions))


def test_backend_picks_the_sampled_tokens_logprob_by_id(tiny):
    """With top-k candidates (logprobs=N > 0) the sampled token need not come first: pick it by id."""
    _, model, tok = tiny
    completion = [40, 41, tok.eos_token_id]
    with vllm_standin(policy=lambda p: completion):
        vllm = make_vllm_generation(model, Accelerator(cpu=True), tok, mode="colocate", logprobs=2)
        out = VLLMBackend(vllm, lockstep=False, eos_ids=[tok.eos_token_id]).generate(PROMPTS[:1], 8)
    assert out.completion_ids == [completion]
    assert out.logprobs == [[-0.5, -0.5, -0.5]]  # the decoy ranked first has -0.1


def test_no_logprobs_and_unscored_tokens():
    assert sampled_logprobs([3, 4], [[-0.2, -1.0], [None]], [[3, 9], [4]])[0] == -0.2
    assert torch.isnan(torch.tensor(sampled_logprobs([3, 4], [[-0.2], [None]], [[3], [4]])[1]))
    with pytest.raises(RuntimeError, match="misaligned"):
        sampled_logprobs([3], [[-0.2]], [[9]])
    vllm = SimpleNamespace(max_completion_length=4, temperature=1.0)
    vllm.generate = lambda **kw: ([[1]], [[5, 6]], None, None)  # SamplingParams(logprobs=None)
    assert VLLMBackend(vllm, lockstep=False, eos_ids=[6]).generate([[1]], 4).logprobs is None


def test_eos_ids_include_the_generation_configs(tiny):
    """Qwen2.5-Instruct ends turns with <|im_end|> (tokenizer) or <|endoftext|> (generation config): both count."""
    _, model, tok = tiny
    model.generation_config.eos_token_id = [tok.eos_token_id, 3]
    assert eos_token_ids(tok, model) == [tok.eos_token_id, 3]
    model.generation_config.eos_token_id = 3
    assert eos_token_ids(tok, model) == [tok.eos_token_id, 3]


def test_a_turn_ending_in_the_second_eos_is_not_truncated(tiny):
    """The engine decides truncation with the backend's EOS ids (the trainer's eos_token_ids), not the tokenizer's."""
    from countdown_env import CountdownFactory

    from epo_trl.models.tiny import build_tokenizer, words_of
    from epo_trl.rollout import CallableBackend, RolloutConfig, RolloutEngine
    from epo_trl.rollout.engine import rollout_metrics

    tok = build_tokenizer(["go", "count", "zero", "won", *words_of([CountdownFactory.prompt_header])])
    second_eos = tok.convert_tokens_to_ids("zero")
    answer = tok("<action> go </action>", add_special_tokens=False)["input_ids"] + [second_eos]
    backend = CallableBackend(lambda p, n, t: [answer for _ in p], eos_ids=[tok.eos_token_id, second_eos])
    engine = RolloutEngine(CountdownFactory(), tok, RolloutConfig(max_turns=4, max_turn_tokens=16))
    try:
        result = engine.run(CountdownFactory().tasks()[:2], backend, "step")
    finally:
        engine.close()
    assert all(e.won for e in result.episodes)
    assert rollout_metrics(result, engine.config)["turn_truncated"] == 0.0


def test_cpu_kv_cache_defaults_to_a_fixed_size_and_keeps_the_users(monkeypatch):
    # unset, vLLM's CPU worker asks for utilization x RAM minus the process's RSS: negative after an in-process
    # warm start (measured: "-3.88/6.63 GiB" after SmolLM2's SFT), and it refuses to start
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    default_cpu_kv_cache()
    assert CPU_KV_CACHE_GIB == 2
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    default_cpu_kv_cache()
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # GPUs size the cache by gpu_memory_utilization
    default_cpu_kv_cache()
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
