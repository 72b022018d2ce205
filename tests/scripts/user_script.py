"""A user's script, as plainly as it comes: build an `EPOTrainer`, train one step, return. No teardown of its own.

Launched as `accelerate launch --num_processes 2 user_script.py MODEL OUT` by tests/test_multiprocess.py. An exit
handler registered before the trainer exists runs after the library's (atexit is last-in, first-out): it records
whether a process group was still alive then, so the test sees that the library, not the user, tore it down.
"""

import atexit
import json
import os
import sys


def record_exit(out: str) -> None:
    import torch.distributed as dist

    rank = os.environ.get("RANK", "0")
    with open(os.path.join(out, f"exit{rank}.json"), "w") as f:
        json.dump({"group_alive_at_exit": dist.is_initialized()}, f)


if __name__ == "__main__":
    model_path, out = sys.argv[1:3]
    atexit.register(record_exit, out)

    from datasets import Dataset

    from epo_trl import EPOConfig, EPOTrainer

    def reward(completions, **kwargs):
        return [float(len(c) % 3) for c in completions]

    args = EPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                     max_steps=1, use_cpu=True, bf16=False, report_to=[], save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = EPOTrainer(model_path, reward, args=args, train_dataset=Dataset.from_dict({"prompt": ["go north"] * 8}))
    trainer.train()
    with open(os.path.join(out, f"trained{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump({"world": trainer.accelerator.num_processes, "step": trainer.state.global_step}, f)
