"""Two real ranks (gloo, CPU): the vLLM server-mode collective and step-mode row padding stay in lockstep."""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.multiprocess


def stub_trainer(accelerator, tokenizer, steps_per_generation: int):
    """The attributes `step_batch.build_training_batch` reads from a GRPOTrainer."""
    args = SimpleNamespace(
        steps_per_generation=steps_per_generation,
        gradient_accumulation_steps=steps_per_generation,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_checkpointing_kwargs=None,
    )
    return SimpleNamespace(
        accelerator=accelerator,
        model=SimpleNamespace(training=True),
        args=args,
        num_generations=4,
        num_iterations=1,
        beta=0.0,
        processing_class=tokenizer,
        eos_token_ids=[tokenizer.eos_token_id],
        # TRL's defaults for what step_batch reads (epo_trl/trainers/trl_surface.py: they are read without defaults)
        scale_rewards="group",
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        state=SimpleNamespace(num_input_tokens_seen=0),
    )


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import json

    from accelerate import Accelerator
    from countdown_env import WORDS, CountdownFactory, CountingBackend
    from vllm_standin import make_vllm_generation, vllm_standin

    from epo_trl.envs.protocol import TaskSpec
    from epo_trl.models.tiny import build_tokenizer, words_of
    from epo_trl.rollout import RankSync, RolloutConfig, RolloutEngine, StepRollout, VLLMBackend
    from epo_trl.trainers.grpo import step_batch

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    tokenizer = build_tokenizer([*WORDS, *words_of([CountdownFactory.prompt_header, "your task is to now current"])])
    answer = tokenizer("<action> go </action>", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # rank 0's episodes end after 1 turn, rank 1's after 4 (plus one of 2): ranks finish at different turns
    turns = [1, 1, 1, 1] if rank == 0 else [4, 4, 4, 2]
    tasks = [TaskSpec("countdown", "count", n, i) for i, n in enumerate(turns)]

    def backend(**vllm_options):
        """TRL's real VLLMGeneration (stand-in engine) behind our backend, lockstep decided as for a trainer."""
        model = SimpleNamespace(name_or_path="scripted", named_modules=lambda: [])
        vllm = make_vllm_generation(model, accelerator, tokenizer, max_completion_length=16, **vllm_options)
        args = SimpleNamespace(
            vllm_mode=vllm_options["mode"],
            vllm_tensor_parallel_size=vllm_options.get("tensor_parallel_size", 1),
            vllm_enable_sleep_mode=False,
        )
        trainer = SimpleNamespace(accelerator=accelerator, args=args, vllm_generation=vllm, eos_token_ids=[0])
        return CountingBackend(VLLMBackend.from_trainer(trainer))

    def play(backend, mode="trajectory"):
        engine = RolloutEngine(CountdownFactory(), tokenizer, RolloutConfig(max_turns=6, max_turn_tokens=8))
        try:
            return [len(e.turns) for e in engine.run(tasks, backend, mode, RankSync(accelerator)).episodes]
        finally:
            engine.close()

    with vllm_standin(policy=lambda p: answer):
        server = backend(mode="server")
        lengths = play(server)
        # colocate with tensor parallelism: every generate all-gathers prompts in the TP group and slices equal parts
        tp = backend(mode="colocate", tensor_parallel_size=2)
        tp_lengths = play(tp, "step")
        # step mode: groups of 4 span the two ranks' 8 episodes; rows padded equally on both ranks
        step_backend = backend(mode="server")
        rollout = StepRollout(
            CountdownFactory(), RolloutConfig(max_turns=6, max_turn_tokens=8), step_backend, tokenizer
        )
        trainer = stub_trainer(accelerator, tokenizer, steps_per_generation=4)
        batch = step_batch.build_training_batch(rollout, [{"prompt": t.key()} for t in tasks], trainer)
    out = {
        "calls": server.calls,
        "lengths": lengths,
        "tp_calls": tp.calls,
        "tp_lengths": tp_lengths,
        "step_calls": step_backend.calls,
        "rows": int(batch["advantages"].numel()),
        "real_rows": int((batch["completion_mask"].sum(1) > 0).sum()),
        "num_items": int(batch["num_items_in_batch"]),
        "local_items": int(batch["completion_mask"].sum()),
        "success": trainer._metrics["train"]["rollout/success_rate"][-1],
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    accelerator.wait_for_everyone()
    # Tear the groups (the TP subgroups too) down before the interpreter exits: left to exit-time destructors, a
    # gloo thread was once still running and the rank died with SIGABRT after the test's work had finished.
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)  # a rank left out of a collective hangs: fail instead
def test_collective_vllm_modes_make_equal_calls_on_both_ranks(tmp_path):
    import json

    import torch.multiprocessing as mp
    from scripts.epo_steps import free_port

    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["lengths"] == [1, 1, 1, 1] and r1["lengths"] == [4, 4, 4, 2]
    # rank 0 keeps calling with dummy prompts until rank 1 is done: same calls, same prompt counts (the max
    # number of active episodes over ranks: rank 1 has 4, 4, 3, 3 active)
    assert r0["calls"] == r1["calls"] == [4, 4, 3, 3]
    assert (r0["tp_lengths"], r1["tp_lengths"]) == ([1, 1, 1, 1], [4, 4, 4, 2])
    assert r0["tp_calls"] == r1["tp_calls"] == [4, 4, 3, 3]  # colocate TP is lockstepped like server mode
    assert r0["step_calls"] == r1["step_calls"]
    # rows: rank 0 has 4, rank 1 has 14 -> both padded to 16 (multiple of steps_per_generation=4, max over ranks)
    assert (r0["real_rows"], r1["real_rows"]) == (4, 14)
    assert r0["rows"] == r1["rows"] == 16
    assert r0["num_items"] == r1["num_items"] == r0["local_items"] + r1["local_items"]
    assert r0["success"] == r1["success"] == 1.0
