"""A config field on vs off on 2 DDP ranks: step-mode EPO over the vLLM stand-in, ranks with different episodes.
Each rank trains twice (the field on, then off) and writes OUT/rank{r}.json: per run the logged losses and IS
metrics and a checksum of every final parameter.

FIELD `skip_on_policy_old_logps` (tests/test_old_logp_skip.py): perturbed sampling log-probs, TRL's forward (the
old-logp pass and the training forward then give bit-identical log-probs). FIELD `share_prompt_forward`
(tests/test_shared_prefix.py): exact sampling log-probs, a reference pass, SGD (the shared forward rounds differently
from TRL's, which Adam's first steps and the perturbed log-probs would amplify into different runs).

Launched as `accelerate launch --config_file multi_gpu.yaml --num_processes 2 old_logp_skip_ddp.py MODEL OUT FIELD`.
"""

import json
import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(model_path: str, out: str, field: str) -> None:
    sys.path.insert(0, TESTS)
    from helpers import tiny_args
    from test_old_logp_skip import COMPARED, _noisy_candidates
    from vllm_standin import Engine, model_checksums, vllm_standin

    from epo_trl import EPOConfig, EPOTrainer
    from epo_trl.envs import task_dataset
    from epo_trl.envs.maze import MazeFactory
    from epo_trl.rollout import RolloutConfig, StepRollout, episode_return_reward

    if field == "skip_on_policy_old_logps":
        Engine._candidates = staticmethod(_noisy_candidates)
        options = dict(share_prompt_forward=False)
    else:
        options = dict(optim="sgd", beta=0.01)
    runs = {}
    for on in (True, False):
        factory = MazeFactory(size=2, task="reach")
        rollout = StepRollout(
            factory, RolloutConfig(max_turns=3, max_turn_tokens=6, require_tags=False, num_workers=1)
        )
        args = tiny_args(
            EPOConfig, f"{out}/{on}", max_steps=3, max_completion_length=18, use_vllm=True, vllm_mode="colocate",
            vllm_sync_check=False, seed=3, per_device_train_batch_size=4, num_generations=4, entropy_coef=0.01,
            max_rows_per_backward=5, **{field: on}, **options,
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
        runs[str(on)] = {"logs": logs, "weights": model_checksums(trainer.accelerator.unwrap_model(trainer.model))}
        rank = trainer.accelerator.process_index
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": trainer.accelerator.num_processes, "runs": runs}, f)


if __name__ == "__main__":
    from epo_trl.distributed import destroy_process_group

    main(*sys.argv[1:4])
    destroy_process_group()
