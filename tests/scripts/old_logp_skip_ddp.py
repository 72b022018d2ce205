"""Skip on vs TRL's path on 2 DDP ranks (tests/test_old_logp_skip.py): step-mode EPO over the vLLM stand-in with
perturbed sampling log-probs, ranks with different episodes. Each rank trains twice (skip on, then off) and writes
OUT/rank{r}.json: per run the logged losses and IS metrics and a checksum of every final parameter.

Launched as `accelerate launch --config_file multi_gpu.yaml --num_processes 2 old_logp_skip_ddp.py MODEL OUT`.
"""

import json
import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(model_path: str, out: str) -> None:
    sys.path.insert(0, TESTS)
    from helpers import tiny_args
    from test_old_logp_skip import COMPARED, _noisy_candidates
    from vllm_standin import Engine, model_checksums, vllm_standin

    from epo_trl import EPOConfig, EPOTrainer
    from epo_trl.envs import task_dataset
    from epo_trl.envs.maze import MazeFactory
    from epo_trl.rollout import RolloutConfig, StepRollout, episode_return_reward

    Engine._candidates = staticmethod(_noisy_candidates)
    runs = {}
    for skip in (True, False):
        factory = MazeFactory(size=2, task="reach")
        rollout = StepRollout(
            factory, RolloutConfig(max_turns=3, max_turn_tokens=6, require_tags=False, num_workers=1)
        )
        args = tiny_args(
            EPOConfig, f"{out}/{skip}", max_steps=3, max_completion_length=18, use_vllm=True, vllm_mode="colocate",
            vllm_sync_check=False, seed=3, per_device_train_batch_size=4, num_generations=4, entropy_coef=0.01,
            max_rows_per_backward=5, skip_on_policy_old_logps=skip,
        )  # fmt: skip
        with vllm_standin():
            trainer = EPOTrainer(
                model=model_path, reward_funcs=[episode_return_reward], args=args,
                train_dataset=task_dataset(factory), rollout_func=rollout,
            )  # fmt: skip
            try:
                trainer.train()
            finally:
                rollout.close()
        logs = [{k: v for k, v in h.items() if k in COMPARED} for h in trainer.state.log_history if "loss" in h]
        runs[str(skip)] = {"logs": logs, "weights": model_checksums(trainer.accelerator.unwrap_model(trainer.model))}
        rank = trainer.accelerator.process_index
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": trainer.accelerator.num_processes, "runs": runs}, f)


if __name__ == "__main__":
    from epo_trl.distributed import destroy_process_group

    main(*sys.argv[1:3])
    destroy_process_group()
