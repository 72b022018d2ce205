"""Ctrl-C and SIGTERM in `epo-trl train`: stop at the end of the current optimizer step, save a checkpoint there
(`save_on_interrupt`, default on), say in one line what was kept, exit 128 + signal (130 / 143).

A second signal stops inside the step (KeyboardInterrupt): nothing of that step is kept, earlier checkpoints are.
Every rank stops at the same step: the flag is max-reduced over ranks at each step end (a rank that got no signal
would otherwise wait in the next step's collectives forever).
"""

from __future__ import annotations

import contextlib
import signal
import threading

from transformers import TrainerCallback

NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class StopOnSignal(TrainerCallback):
    def __init__(self, save: bool = True):
        self.save = save
        self.signal: int | None = None
        self.stopped_at: int | None = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in NAMES}
        for s in NAMES:
            signal.signal(s, self._handle)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt  # the second signal: stop now, inside the step
        self.signal = signum

    def _any_rank_signalled(self) -> int:
        import torch
        import torch.distributed as dist

        local = self.signal or 0
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([local], dtype=torch.long, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._any_rank_signalled()
        if signum:
            self.signal = self.signal or signum
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = control.should_save or self.save
        return control

    def exit_code(self) -> int:
        return 128 + int(self.signal or signal.SIGINT)

    def kept(self, trainer) -> str:
        from ..trainers.checkpoints import newest_complete

        last, _ = newest_complete(trainer.args.output_dir, needs_optimizer=not trainer.args.save_only_model)
        return f"newest complete checkpoint: {last}" if last else "no complete checkpoint was written"

    def describe(self, trainer, inside_step: bool) -> str:
        name = NAMES.get(self.signal, "a signal") if self.signal else "Ctrl-C (SIGINT)"
        if inside_step:
            return (
                f"interrupted by a second {name} inside step {trainer.state.global_step + 1}: that step is lost; "
                + (self.kept(trainer) + " (resume: --resume_from_checkpoint true).")
            )
        step = self.stopped_at if self.stopped_at is not None else trainer.state.global_step
        if self.save:
            what = f"saved checkpoint-{step} in {trainer.args.output_dir}"
        else:
            what = f"nothing saved (save_on_interrupt false); {self.kept(trainer)}"
        return f"interrupted by {name}: stopped after step {step}; {what} (resume: --resume_from_checkpoint true)."
