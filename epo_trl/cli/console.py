"""The console of `epo-trl train` and `epo-trl demo`: TRL's progress bar and one short line per logging step.

TRL's default prints the whole metric dict (~40 keys, ~1,500 characters) every step; the full dict still goes to
`logs.jsonl` and TensorBoard. Here each logging step writes the few numbers a person watches:

    step   12/40 | success 0.62 | return  3.10 | entropy 1.234 | out-of-band 0.02 | kl 0.0031 | 4.1 s/step
"""

from __future__ import annotations

import time

from transformers import PrinterCallback, ProgressCallback

# (label, log key, format): shown when the key is in the step's logs; the first key found wins
COLUMNS = (
    ("success", ("rollout/success_rate",), "{:.2f}"),
    ("return", ("rollout/mean_return", "reward"), "{:6.2f}"),
    ("entropy", ("entropy",), "{:.3f}"),
    ("out-of-band", ("epo/out_of_band_frac",), "{:.2f}"),
    ("T_aepo", ("aepo/temperature",), "{:.2f}"),
    ("kl", ("kl",), "{:.4f}"),
    ("loss", ("loss",), "{:.4f}"),  # the SFT warm start's steps (RL steps show their success and entropy first)
)


def format_line(logs: dict, step: int, max_steps: int, seconds_per_step: float | None) -> str:
    """One console line for a step's logs."""
    width = len(str(max_steps))
    parts = [f"step {step:>{width}}/{max_steps}"]
    for label, keys, fmt in COLUMNS:
        key = next((k for k in keys if isinstance(logs.get(k), (int, float))), None)
        if key is not None:
            parts.append(f"{label} {fmt.format(logs[key])}")
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.1f} s/step")
    return " | ".join(parts)


class ConsoleProgress(ProgressCallback):
    """TRL's progress bar, with `format_line` instead of the whole dict under it."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._last = (time.monotonic(), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "train_runtime" in logs:  # the end-of-training summary
            self.training_bar.write(f"done: {state.global_step} steps in {logs['train_runtime']:.0f} s")
            return
        now, step = time.monotonic(), state.global_step
        then, last_step = self._last
        per_step = (now - then) / (step - last_step) if step > last_step else None
        self._last = (now, step)
        self.training_bar.write(format_line(logs, step, state.max_steps, per_step))

    def close(self) -> None:
        """Close the bar now (a run that stopped on an error): its last state is drawn before the error line, not
        after it when the bar is garbage-collected."""
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


def use_console(trainer) -> ConsoleProgress:
    """Replace the trainer's dict-printing callback (progress bar or printer) with `ConsoleProgress`; return it."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    console = ConsoleProgress()
    trainer.add_callback(console)
    return console
