"""PNG plots of a training run from `trainer.state.log_history` (`pip install "epo-trl[plots]"` for matplotlib).

    from epo_trl.cli.plots import write_run_plots
    write_run_plots(trainer.state.log_history, trainer.args.output_dir)   # -> list of PNG paths written

Plots (each written only when its metrics were logged): `success_rate.png` (`rollout/success_rate`),
`return.png` (`rollout/mean_return`), `turn_entropy.png` (`epo/turn_entropy/<t>`, one line per turn) and
`entropy_band.png`: EPO's reference entropy `epo/ref_entropy_mean` against the current entropy (`entropy`,
`epo/entropy_turn_first|last`), with the band [κ_low·H_ref, κ_high·H_ref] shaded when the κ values are given.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Sequence

logger = logging.getLogger(__name__)

_TURN_KEY = re.compile(r"epo/turn_entropy/(\d+)$")
MAX_TURN_LINES = 12  # more turns than this: plot an evenly spaced subset, a legend of 50 lines is unreadable


def series(log_history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged metric, in logging order."""
    steps, values = [], []
    for entry in log_history:
        if key in entry and "step" in entry:
            steps.append(float(entry["step"]))
            values.append(float(entry[key]))
    return steps, values


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_run_plots(
    log_history: Sequence[dict],
    out_dir: str,
    kappa_low: float | None = None,
    kappa_high: float | None = None,
) -> list[str]:
    """Write the run's PNG plots into `out_dir`; return their paths ([] with a warning without matplotlib)."""
    if not plots_available():
        logger.warning('matplotlib is not installed: no plots written (pip install "epo-trl[plots]").')
        return []
    # Figure + Agg canvas directly: no pyplot global state, no display backend needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []

    def save(fig, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        written.append(path)

    def single(key: str, title: str, ylabel: str, name: str) -> None:
        steps, values = series(log_history, key)
        if not steps:
            return
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        save(fig, name)

    single("rollout/success_rate", "Success rate (training episodes)", "success rate", "success_rate.png")
    single("rollout/mean_return", "Mean episode return", "return", "return.png")

    turns = sorted({int(m.group(1)) for entry in log_history for k in entry if (m := _TURN_KEY.match(k))})
    if turns:
        if len(turns) > MAX_TURN_LINES:
            stride = -(-len(turns) // MAX_TURN_LINES)
            turns = turns[::stride]
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        for t in turns:
            ax.plot(*series(log_history, f"epo/turn_entropy/{t}"), label=f"turn {t}")
        ax.set(title="Action-token entropy per turn", xlabel="step", ylabel="entropy (nats)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        save(fig, "turn_entropy.png")

    ref_steps, ref = series(log_history, "epo/ref_entropy_mean")
    if ref_steps:
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        if kappa_high is not None:
            low = [(kappa_low or 0.0) * r for r in ref]
            ax.fill_between(
                ref_steps, low, [kappa_high * r for r in ref], alpha=0.15, label="band κ_low..κ_high × ref"
            )
        ax.plot(ref_steps, ref, color="black", linestyle="--", label="reference H_ref (mean over turns)")
        for key, label in (
            ("entropy", "current (token mean)"),
            ("epo/entropy_turn_first", "current, first turn"),
            ("epo/entropy_turn_last", "current, last turn"),
        ):
            steps, values = series(log_history, key)
            if steps:
                ax.plot(steps, values, label=label)
        ax.set(title="EPO entropy band: reference vs current", xlabel="step", ylabel="entropy (nats)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "entropy_band.png")
    return written
