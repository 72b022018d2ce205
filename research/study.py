"""`python -m research.study`: GRPO vs EPO-Base vs EPO vs AEPO on the built-in maze (or, `--setting coin`, on a
long-horizon TextWorldExpress game), several seeds.

Every run goes through the real CLI path (`epo_trl.cli.train.load_config` on the setting's recipe, e.g. the demo's
`recipes/cpu/demo.yaml`, with `--algo` and the few overrides below, then `build_trainer`), so algorithms differ only
in what `--algo` switches. The setting is the demo's (a hidden-64 tiny model warm-started on a noisy demonstrator,
KL anchor, batch-std rewards, trajectory mode), where plain GRPO learns. Per seed, the warm start is built once and shared by every
algorithm (same start, same held-out "before"). Per optimizer step it records train success, TRL's token entropy and
the per-turn entropies; after training, held-out success with HF generate on `valid_seen` and `valid_unseen`.
Before the runs, it records the reference policies (`epo_trl.rollout.baselines`: random, walker, expert, ceiling) on
the same held-out tasks. Writes one JSON per finished run (so an interrupted study can still be reported),
`results.json`, PNG plots and `docs/study.md` (tables of held-out success with the reference rows, paired per-seed
differences between methods, training dynamics, all with 95% intervals; an answer generated from the data).
Runs execute as subprocesses, `--jobs` at a time, each with cores/jobs torch threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from epo_trl.cli.demo import QUICK as QUICK_OVERRIDES
from epo_trl.cli.train import DEMO_RECIPE
from epo_trl.stats import mean_ci, paired_differences, share

AEPO_TARGET_ENTROPY = 0.05  # the maze's H*: between the warm start's entropy and a collapsed policy's

# On the maze the four algorithms are compared in the demo's trajectory mode (one row per episode); the EPO run is
# exactly `make demo` (tested), so its row is the demo's spread over seeds. "epo-step" (opt-in): EPO in
# step mode (one row per turn), from a warm start rendered in step mode.
# Opt-in variants that probe the failures EPO targets (docs/study/setting.md): "-nokl" drops the KL anchor (can
# the policy collapse early?); "-bonus" makes the entropy bonus 10x stronger (does a plain bonus go unstable, and
# does EPO's smoothing hold it?).
ARMS = ("grpo", "epo-base", "epo", "aepo", "epo-step", "grpo-nokl", "epo-nokl", "epo-base-bonus", "epo-bonus")
LABELS = {
    "grpo": "GRPO",
    "epo-base": "EPO-Base",
    "epo": "EPO",
    "aepo": "AEPO",
    "epo-step": "EPO, step mode",
    "grpo-nokl": "GRPO, no KL",
    "epo-nokl": "EPO, no KL",
    "epo-base-bonus": "EPO-Base, bonus 0.1",
    "epo-bonus": "EPO, bonus 0.1",
}
# A study arm is a method (`--algo`) plus overrides: the method of each arm (default: the arm's own name)
ARM_METHOD = {
    "epo-step": "epo",
    "grpo-nokl": "grpo",
    "epo-nokl": "epo",
    "epo-base-bonus": "epo-base",
    "epo-bonus": "epo",
}
ARM_EXTRA: dict[str, dict] = {
    "epo-step": {"rollout_mode": "step"},
    "aepo": {"entropy_coef": 0.0},  # AEPO alone (TRL's bonus off); its H* is the setting's (Setting.algo_extra)
    "grpo-nokl": {"beta": 0.0},
    "epo-nokl": {"beta": 0.0},
    "epo-base-bonus": {"entropy_coef": 0.1},
    "epo-bonus": {"entropy_coef": 0.1},
}
# What the study changes in the demo's recipe: quiet runs (the study keeps log_history), one warm start per seed.
SHARED = {"report_to": [], "disable_tqdm": True}
FULL = {"algos": ARMS[:4], "seeds": (0, 1, 2, 3, 4), "eval_tasks": 64}
QUICK = {"algos": ("grpo", "aepo", "epo-step"), "seeds": (0,), "eval_tasks": 4}
GAIN_TARGET = 0.30  # the demo's bar: held-out success after - before


@dataclass(frozen=True)
class Setting:
    """Where a study runs: its recipe, its default plan and outputs, and the report's setting-specific text."""

    recipe: Path
    output_dir: str
    report: str
    title: str  # the report's title ends "on {title}"
    plan: dict  # algos, seeds, eval_tasks of the full study
    setup: str  # the report's setup paragraph after the shared part: warm start and held-out splits
    caveats: str
    why: str  # where the report points for why the setting is what it is
    labels: dict = field(default_factory=dict)  # LABELS overrides
    quick: dict = field(default_factory=lambda: QUICK)  # `--quick`: its plan, then its recipe overrides
    quick_overrides: dict = field(default_factory=lambda: QUICK_OVERRIDES)
    quick_env_kwargs: dict = field(default_factory=dict)  # `--quick`: merged into the recipe's env_kwargs
    algo_extra: dict = field(default_factory=dict)  # per-algo overrides on top of ARM_EXTRA

    @property
    def all_labels(self) -> dict:
        return {**LABELS, **self.labels}

    def extra(self, algo: str) -> dict:
        """What `algo` changes in the recipe here: ARM_EXTRA, then this setting's own."""
        return {**ARM_EXTRA.get(algo, {}), **self.algo_extra.get(algo, {})}


MAZE = Setting(
    recipe=DEMO_RECIPE,
    output_dir="docs/study",
    report="docs/study.md",
    title="the maze, from a warm start RL can improve",
    plan=FULL,
    setup="""GRPO
runs on `MultiTurnGRPOTrainer` (the multi-turn base), EPO-Base and EPO on `EPOTrainer`, AEPO on `AEPOTrainer`, all
four in trajectory mode (one row per episode, the demo's mode). The EPO run is `make demo` with the same seed (same
recipe), so its row is the demo's spread over seeds.
Warm start, per seed and rollout mode, shared by the algorithms of that mode: behaviour cloning on the expert
until the model, sampling, wins {target_success} of 32 train tasks (at most {steps} steps, checked
every {check_every}), then {noisy_steps} steps on a noisy demonstrator's plays (each turn a random
admissible action with probability {noise}, else the expert's move). Held-out success:
HF generate at temperature 1 on the first {eval_tasks} tasks of `valid_seen` (4x4 `trail` mazes, none of which
occurs in train: checked by content) and `valid_unseen` (5x5 mazes, a size never trained on), before RL (the warm
start) and after, next to policies that learn nothing on the same tasks (random, the walker, and the expert, whose
success is the ceiling: `epo_trl.rollout.baselines`).""",
    caveats="""Caveats: {seeds} seed(s), {max_steps} steps of
{episodes_per_step} episodes on a ~0.2M-parameter tiny model
and mazes the expert wins in 3-4 moves by following signs. The setting was chosen so that a learner can beat
policies that learn nothing on unseen mazes, not to provoke the failures EPO targets (early entropy collapse, late
instability under a plain bonus). Two variants probe them (`--algos grpo-nokl epo-nokl epo-base-bonus epo-bonus`):
no KL anchor, and a 10x stronger entropy bonus. The long-horizon study (`--setting coin`,
[study-long-horizon.md](study-long-horizon.md)) runs the methods on 30-turn Coin Collector games.""",
    algo_extra={"aepo": {"aepo_target_entropy": AEPO_TARGET_ENTROPY}},
    why="Why the setting is what it is, and the negative results that led to it: "
    "[docs/study/setting.md](study/setting.md).",
    labels={"epo": "EPO (make demo)"},
)
COIN = Setting(
    recipe=DEMO_RECIPE.parent / "twx_coin_long.yaml",
    output_dir="docs/study/long-horizon",
    report="docs/study-long-horizon.md",
    title="long-horizon Coin Collector (TextWorldExpress, 11 rooms, doors)",
    plan={"algos": ("grpo", "epo-base", "epo", "aepo"), "seeds": (0, 1, 2, 3, 4), "eval_tasks": 16},
    setup="""GRPO
runs on `MultiTurnGRPOTrainer`, EPO-Base and EPO on `EPOTrainer`, AEPO on `AEPOTrainer`, all in step mode (one row
per turn: a 30-turn episode in one row is ~3k tokens even with the furniture dropped, and its behaviour-cloning
warm start did not fit the budget). AEPO re-samples whole episodes at its temperature and trains on every turn of
the above-mean ones, with H* = 0.3 (the warm starts' entropy at step 1: AEPO holds entropy where RL starts).
Warm start, per seed, shared by the methods: {steps} steps of behaviour cloning on the game's gold paths, stopped
early on purpose (cloned longer, the model wins less: it copies the gold choices without the map knowledge behind
them and walks in loops); no noisy phase (the gold path cannot re-plan from a state off it). Held-out
success: HF generate at temperature 1 on the first {eval_tasks} tasks of `valid_seen` (the dev fold) and
`valid_unseen` (the test fold: other seeds of the same generator), before RL (the warm start) and after.""",
    caveats="""Caveats: {seeds} seed(s), {max_steps} steps of
{episodes_per_step} episodes on a ~0.2M-parameter tiny model, sized to fit 60 minutes on 2 CPU cores. Coin
Collector with 11 rooms and doors has gold paths of 14 moves on average (up to 33) and the episodes run up to 30
turns: long for this project's CPU runs, short next to the paper's ALFWorld/ScienceWorld horizons, and {max_steps}
steps are few for a late collapse to show. See "What it would take" below.""",
    quick={"algos": ("grpo", "epo"), "seeds": (0,), "eval_tasks": 2},
    # the demo's quick run on 8 train games (each episode starts a JVM), no noisy phase (the gold path cannot re-plan)
    quick_overrides={**QUICK_OVERRIDES, "warmstart_noisy_steps": 0},
    quick_env_kwargs={"num_train": 8, "num_valid": 2},
    # H* = the warm starts' entropy at RL step 1 (0.29-0.34 over the seeds, measured): AEPO holds it there
    algo_extra={"aepo": {"aepo_target_entropy": 0.3}},
    why="Why the setting is what it is (measured): the comments in `recipes/cpu/twx_coin_long.yaml`.",
)
SETTINGS = {"maze": MAZE, "coin": COIN}


# ----- one run ---------------------------------------------------------------------------------------------------
def _setup(overrides: dict, algo: str, seed: int, output_dir: str, recipe: str = str(DEMO_RECIPE), extra=None):
    from epo_trl.cli.train import load_config

    from .bench.common import quiet_logs, setup_offline

    setup_offline()
    quiet_logs()
    extra = ARM_EXTRA.get(algo, {}) if extra is None else extra
    values = {**overrides, **extra, "algo": ARM_METHOD.get(algo, algo), "seed": seed, "output_dir": output_dir}
    return load_config([recipe], overrides=values)


def warm_settings(script) -> dict:
    """The recipe's warm start, as the report describes it."""
    return {"steps": script.warmstart_steps, "target_success": script.warmstart_target_success,
            "check_every": script.warmstart_check_every,
            "noisy_steps": script.warmstart_noisy_steps, "noise": script.warmstart_noise}  # fmt: skip


def mode_of(algo: str, overrides: dict, recipe_mode: str = "trajectory") -> str:
    """The rollout mode `algo` runs in (and its warm start is rendered in)."""
    return ARM_EXTRA.get(algo, {}).get("rollout_mode", overrides.get("rollout_mode", recipe_mode))


def _held_out(model, tokenizer, factory, rollout, eval_tasks: int, seed: int, mode: str) -> dict[str, float]:
    from epo_trl.rollout.evaluation import held_out

    result = held_out(model, tokenizer, factory, rollout, eval_tasks, 1.0, seed, mode)
    return {split: r["success_rate"] for split, r in result.items()}


def warm_one(seed: int, mode: str, output_dir: str, overrides: dict, eval_tasks: int, recipe: str) -> dict:
    """Build seed's warm-started model for `mode` in `output_dir/tiny-model` (shared by every algo of that mode), as
    `epo-trl train` builds it from the recipe, and its held-out success."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from epo_trl.cli.train import WARM_START_FILE, resolve_model
    from epo_trl.envs import make_factory

    script, rollout, _ = _setup({**overrides, "rollout_mode": mode}, "grpo", seed, output_dir, recipe)
    factory = make_factory(script.env, **script.env_kwargs)
    t0 = time.perf_counter()
    model_dir = resolve_model(script, factory, output_dir, rollout, seed)
    summary = json.loads(Path(model_dir, WARM_START_FILE).read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = _held_out(model, AutoTokenizer.from_pretrained(model_dir), factory, rollout, eval_tasks, seed, mode)
    return {"seed": seed, "mode": mode, "warm_s": time.perf_counter() - t0, "warm_start": summary, "before": before}


def run_one(
    algo: str, seed: int, output_dir: str, overrides: dict, eval_tasks: int, warm_dir: str, recipe: str, extra: dict
) -> dict:
    """Train one (algo, seed) from the seed's warm start through the CLI path; per-step metrics, held-out success."""
    import torch
    from transformers import PrinterCallback

    from epo_trl.cli.train import build_trainer, train_and_close

    script, rollout, args = _setup(overrides, algo, seed, output_dir, recipe, extra)
    shutil.copytree(warm_dir, os.path.join(args.output_dir, "tiny-model"))  # where resolve_model looks
    trainer = build_trainer(script, rollout, args)
    trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; the study keeps log_history instead
    t0 = time.perf_counter()
    _, train_s = train_and_close(trainer)
    steps = [h for h in trainer.state.log_history if "rollout/success_rate" in h]
    per_turn: dict[str, list[float | None]] = {}
    for i, h in enumerate(steps):
        for key, value in h.items():
            if key.startswith("epo/turn_entropy/"):
                per_turn.setdefault(key.rsplit("/", 1)[-1], [None] * len(steps))[i] = value
    torch.manual_seed(seed)
    factory = trainer.rollout_func.factory
    held_out = _held_out(
        trainer.model, trainer.processing_class, factory, rollout, eval_tasks, seed, script.rollout_mode
    )
    return {
        "algo": algo,
        "seed": seed,
        "mode": script.rollout_mode,
        "train_s": train_s,
        "eval_s": time.perf_counter() - t0 - train_s,
        "step": [h.get("step", i + 1) for i, h in enumerate(steps)],
        "success": [h["rollout/success_rate"] for h in steps],
        "entropy": [h.get("entropy", math.nan) for h in steps],
        "invalid_rate": [h.get("rollout/invalid_action_rate", math.nan) for h in steps],
        "turn_entropy": dict(sorted(per_turn.items(), key=lambda kv: int(kv[0]))),
        "held_out": held_out,
    }


def _child(argv: list[str]) -> int:
    kind, threads, result_file, payload = argv
    import torch

    torch.set_num_threads(int(threads))
    job = json.loads(payload)
    result = warm_one(**job) if kind == "warm" else run_one(**job)
    Path(result_file).write_text(json.dumps(result))
    return 0


def _launch(kind: str, job: dict, threads: int, result_file: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "research.study", "--child", kind, str(threads), result_file, json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["exit " + str(proc.returncode)]
        return {"algo": job.get("algo", "warm start"), "seed": job["seed"], "error": tail}
    return json.loads(Path(result_file).read_text())


# ----- statistics ------------------------------------------------------------------------------------------------
# The math (t intervals, binomial intervals, paired differences) is in epo_trl.stats; here, what the study measures.
_mean_ci = mean_ci  # the name study_llm and the tests import
SPLITS = ("valid_seen", "valid_unseen")  # rollout.evaluation.HELD_OUT_SPLITS, without importing torch
BASELINE_K = 4  # episodes per task of each reference policy (random, walker, expert) on the held-out tasks


def run_stats(run: dict) -> dict:
    """Scalar summaries of one run (quarters of the run's steps; at least one step each)."""
    ent, succ = run["entropy"], run["success"]
    n = len(ent)
    q = max(n // 4, 1)
    late = ent[n // 2 :] if n > 1 else ent
    collapse = collapse_step(ent, succ)
    return {
        "diverged": float(max(ent) > DIVERGED_NATS),
        "collapsed": float(collapse is not None),
        "collapse_step": math.nan if collapse is None else float(collapse),
        "initial_train_success": statistics.fmean(succ[:q]),  # first quarter: close to the warm-started model
        "final_train_success": statistics.fmean(succ[-q:]),  # last quarter: one step alone is too noisy
        "before_seen": run["before"]["valid_seen"],
        "valid_seen": run["held_out"]["valid_seen"],
        "gain_seen": run["held_out"]["valid_seen"] - run["before"]["valid_seen"],
        "gain_reached": float(run["held_out"]["valid_seen"] - run["before"]["valid_seen"] >= GAIN_TARGET),
        "before_unseen": run["before"]["valid_unseen"],
        "valid_unseen": run["held_out"]["valid_unseen"],
        "final_entropy": ent[-1],
        "min_entropy": min(ent),
        "early_drop": ent[0] - ent[min(q, n - 1)],
        "late_entropy_std": statistics.pstdev(late) if len(late) > 1 else 0.0,
        # The std above also counts a steady trend; the std of step-to-step changes is the oscillation alone.
        "late_change_std": statistics.pstdev([b - a for a, b in zip(late, late[1:])]) if len(late) > 2 else 0.0,
    }


DIVERGED_NATS = 5.0  # uniform over the tiny vocabulary is ~6.3 nats: above 5 the policy has fallen apart
# Entropy collapse = the policy went (near-)deterministic without learning: at some step k the entropy is below
# COLLAPSE_FRACTION x its step-1 value while the train success, averaged over the quarter-run window ending at k, is
# not above its first-quarter mean. Learning sharpens a policy too (the committed maze runs reach 0.11-0.62 x their
# step-1 entropy at their lowest while success climbs), so the entropy test alone (the former "below 0.5 x step 1")
# measured sharpening: it fired on 19 of the 20 maze runs, all of which learned. The new one fires on none of them;
# the success test keeps it to a policy that narrowed without getting better.
COLLAPSE_FRACTION = 0.1
COLLAPSE_TEXT = (
    f"entropy below {COLLAPSE_FRACTION} x its step-1 value at a step where the train success, averaged over the "
    "quarter-run window ending there, is not above its first-quarter mean"
)


def collapse_step(entropy: list[float], success: list[float]) -> int | None:
    """The first optimizer step k (1-based) whose entropy is below COLLAPSE_FRACTION x the step-1 entropy while the
    mean train success over steps max(1, k-q+1)..k (q = a quarter of the run, at least 1) is not above the mean over
    the first quarter; None if no step is."""
    q = max(len(success) // 4, 1)
    first_quarter = statistics.fmean(success[:q])
    for k, h in enumerate(entropy, 1):
        if h < COLLAPSE_FRACTION * entropy[0] and statistics.fmean(success[max(k - q, 0) : k]) <= first_quarter:
            return k
    return None


# Columns of the report's tables. Held-out success (with the reference policies' rows):
HELD_OUT_COLUMNS = {
    "before_seen": "valid_seen before RL",
    "valid_seen": "valid_seen after RL",
    "gain_seen": "valid_seen gain (after - before)",
    "gain_reached": f"share of seeds with gain >= {GAIN_TARGET:.2f}",
    "before_unseen": "valid_unseen before RL",
    "valid_unseen": "valid_unseen after RL",
}
# Training dynamics:
DYNAMICS_COLUMNS = {
    "diverged": "share of seeds diverged (entropy > 5 nats)",
    "collapsed": f"share of seeds collapsed (entropy < {COLLAPSE_FRACTION} x step 1, train success not up)",
    "collapse_step": "collapse step (seeds that collapse)",
    "initial_train_success": "train success (first quarter)",
    "final_train_success": "train success (last quarter)",
    "final_entropy": "final entropy",
    "min_entropy": "min entropy",
    "early_drop": "entropy drop, first quarter",
    "late_entropy_std": "entropy std, second half",
    "late_change_std": "std of step-to-step entropy change, second half",
}
SHARE_COLUMNS = ("diverged", "collapsed", "gain_reached")  # 0/1 per seed: k of n seeds, exact binomial interval
# every other column: mean ± Student t interval over seeds
STAT_COLUMNS = {k: v for k, v in {**HELD_OUT_COLUMNS, **DYNAMICS_COLUMNS}.items() if k not in SHARE_COLUMNS}
# Paired comparisons besides "every algorithm vs the first one run (the baseline)": the method a variant adds to.
PAIRED_WITH = {"epo": "epo-base", "epo-bonus": "epo-base-bonus"}


def _by_algo(runs: list[dict]) -> dict[str, list[dict]]:
    """Finished runs grouped by algorithm, in `ARMS` order (the table's and the plots')."""
    by_algo: dict[str, list[dict]] = {}
    for run in runs:
        if "error" not in run:
            by_algo.setdefault(run["algo"], []).append(run)
    return dict(sorted(by_algo.items(), key=lambda kv: ARMS.index(kv[0])))


def aggregate(runs: list[dict]) -> dict:
    """Per algorithm: mean ± 95% t interval over seeds of every STAT_COLUMNS column; for SHARE_COLUMNS, the count of
    seeds with the property and the exact 95% interval of the share (`stats.share`)."""
    out = {}
    for algo, rs in _by_algo(runs).items():
        stats = [run_stats(r) for r in rs]
        out[algo] = {k: mean_ci([s[k] for s in stats]) for k in STAT_COLUMNS}
        out[algo].update({k: share([s[k] for s in stats]) for k in SHARE_COLUMNS})
        out[algo]["seeds"] = len(rs)
        out[algo]["train_s"] = mean_ci([r["train_s"] for r in rs])
    return out


def comparisons(algos: list[str], paired_with: dict[str, str] = PAIRED_WITH) -> list[tuple[str, str]]:
    """The (method, baseline) pairs a report compares: every algorithm vs the first (the baseline), then each
    algorithm vs the one it adds to (`paired_with`, e.g. EPO vs EPO-Base) where both ran."""
    if not algos:
        return []
    pairs = [(a, algos[0]) for a in algos[1:]]
    return pairs + [(a, b) for a, b in paired_with.items() if a in algos[1:] and b in algos[1:]]


def paired(runs: list[dict]) -> list[dict]:
    """Per comparison and held-out split: the per-seed differences in held-out success after RL, method - baseline,
    and their mean ± 95% t interval (`stats.paired_differences`). Only pairs in the same rollout mode: those share
    each seed's warm start, so the seed's level cancels."""
    by_algo = _by_algo(runs)
    out = []
    for method, base in comparisons(list(by_algo)):
        if by_algo[method][0]["mode"] != by_algo[base][0]["mode"]:
            continue
        for split in SPLITS:
            per_seed = [{r["seed"]: r["held_out"][split] for r in by_algo[a]} for a in (method, base)]
            out.append({"method": method, "baseline": base, "split": split, **paired_differences(*per_seed)})
    return out


def reference_baselines(script, rollout, eval_tasks: int, k: int = BASELINE_K) -> dict[str, dict[str, float]]:
    """The reference policies' success (`epo_trl.rollout.baselines`: random, walker, expert, and the ceiling) on the
    held-out tasks the study evaluates (the first `eval_tasks` of each split, the same turn limit), per split."""
    from epo_trl.envs import make_factory
    from epo_trl.rollout.baselines import baselines

    factory = make_factory(script.env, **script.env_kwargs)
    try:
        return {split: baselines(factory, factory.tasks(split)[:eval_tasks], rollout.max_turns, k=k, seed=0)
                for split in SPLITS}  # fmt: skip
    finally:
        factory.close()


def scale_note(runs: list[dict], episodes_per_step: int) -> str:
    """What a study at the paper's scale would cost, extrapolated from this study's measured seconds per step."""
    per_step = [r["train_s"] / len(r["step"]) for r in runs if r.get("step")]
    if not per_step:
        return ""
    sec = statistics.fmean(per_step)
    paper = 150 * sec * 128 / episodes_per_step  # (paper) 150 steps of 16 tasks x 8 episodes, ALFWorld
    return (
        f"Measured here: {sec:.0f} s per optimizer step of {episodes_per_step} episodes (mean over runs, each on one "
        f"thread with another run on the other core), so {len(runs)} runs of {len(runs[0]['step'])} steps is what "
        "60 minutes on 2 cores holds. The paper trains 150 steps (ALFWorld; 125 on ScienceWorld) of 16 tasks x 8 "
        "episodes, up to 50 turns, with Qwen2.5-3B/7B. At the tiny model's cost per episode, one such run would take "
        f"{paper / 3600:.0f} h on one thread here, before the model is 10,000x larger. That is a GPU job: "
        "`recipes/textworld_express/qwen2.5-1.5b_epo.yaml` is the paper-style recipe for this game."
    )


# ----- plots and report ------------------------------------------------------------------------------------------
def _curves(rs: list[dict], key: str):
    import numpy as np

    n = min(len(r[key]) for r in rs)
    data = np.array([[math.nan if v is None else v for v in r[key][:n]] for r in rs], dtype=float)
    return np.arange(1, n + 1), np.nanmean(data, 0), np.nanstd(data, 0)


def plot(runs: list[dict], out: Path, labels: dict = LABELS) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by_algo = _by_algo(runs)
    files = []
    for key, ylabel, name in (("entropy", "token entropy (nats)", "entropy.png"),
                              ("success", "train success rate", "success.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for algo, rs in by_algo.items():
            x, mean, std = _curves(rs, key)
            ax.plot(x, mean, label=f"{labels[algo]} (n={len(rs)})")
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel}: mean ± std across seeds")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    # Per-turn entropy early (first quarter) vs late (last quarter), averaged over seeds.
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, phase in zip(axes, ("first", "last")):
        for algo, rs in by_algo.items():
            turns = sorted({int(t) for r in rs for t in r["turn_entropy"]})
            means = []
            for t in turns:
                vals = []
                for r in rs:
                    series = [v for v in r["turn_entropy"].get(str(t), []) if v is not None]
                    q = max(len(series) // 4, 1)
                    part = series[:q] if phase == "first" else series[-q:]
                    vals += part
                means.append(np.mean(vals) if vals else np.nan)
            ax.plot(turns, means, marker="o", label=labels[algo])
        ax.set_title(f"per-turn entropy, {phase} quarter of steps")
        ax.set_xlabel("turn")
    axes[0].set_ylabel("token entropy (nats)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "turn_entropy.png", dpi=110)
    plt.close(fig)
    files.append("turn_entropy.png")
    return files


def _pm(ms: tuple[float, float], digits: int = 3) -> str:
    mean, ci = ms
    if math.isnan(mean):  # e.g. the collapse step where no seed collapses
        return "-"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}" if not math.isnan(ci) else f"{mean:.{digits}f}"


def _share(s: dict, digits: int = 2) -> str:
    """k of n seeds and the exact 95% interval of the share: "4/5 (0.28-0.99)"."""
    if not s["seeds"]:
        return "-"
    return f"{s['count']}/{s['seeds']} ({s['low']:.{digits}f}-{s['high']:.{digits}f})"


def _diff(d: dict) -> str:
    """A paired difference: its mean ± the 95% t half-width (the mean alone for one seed)."""
    if math.isnan(d["mean"]):
        return "-"
    return f"{d['mean']:+.3f}" + ("" if math.isnan(d["half"]) else f" ± {d['half']:.3f}")


def _verdict(d: dict) -> str:
    if math.isnan(d["half"]):
        return "one seed: no interval"
    if d["mean"] - d["half"] > 0:
        return "above zero at 95% confidence"
    if d["mean"] + d["half"] < 0:
        return "below zero at 95% confidence"
    return "the interval includes zero: no difference shown"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *map(_row, rows)]


REFERENCES = {"random": "random", "walker": "walker", "expert": "expert (ceiling)"}  # policy: its row's label


def reference(baselines: dict | None, split: str, policy: str) -> str:
    """A reference policy's held-out success on `split` (the expert's with the ceiling in parentheses); "not
    recorded" where the results predate the reference policies, "-" where the env cannot play it (no expert)."""
    if not baselines:
        return "not recorded"
    b = baselines.get(split, {})
    if policy not in b:
        return "-"
    return f"{b[policy]:.3f}" + (f" ({b['ceiling']:.3f})" if policy == "expert" and "ceiling" in b else "")


def reference_text(baselines: dict | None, k: int | None) -> str:
    """What the reference rows are (or that they were not recorded)."""
    if not baselines:
        return (
            "Reference rows (random, walker, expert (ceiling): `epo_trl.rollout.baselines`): not recorded; these "
            "results predate them, and a re-run of the command records them."
        )
    return (
        "Reference rows: policies that learn nothing (`epo_trl.rollout.baselines`), played on the same held-out tasks "
        f"with the same turn limit, {k or '?'} episode(s) per task. random = a uniformly random admissible action each "
        "turn; walker = takes or opens whatever it is offered, else moves through an exit other than the one it came "
        "in by; expert (ceiling) = the env's planner, re-planned every turn, and in parentheses the ceiling (the "
        "share of these tasks it can win within the turn limit, the best any policy can score). They do not "
        "train: the same number before and after."
    )


def paired_table(pairs: list[dict], labels: dict) -> list[str]:
    """One row per (method - baseline, held-out split): seeds, mean difference ± 95% CI, every seed's difference."""
    if not pairs:
        return ["No pair of algorithms in the same rollout mode to compare."]
    header = ["method - baseline", "held-out split", "seeds", "mean difference ± 95% CI", "per seed (seed: diff.)"]
    rows = []
    for d in pairs:
        per_seed = ", ".join(f"{s}: {v:+.3f}" for s, v in zip(d["seeds"], d["differences"]))
        rows.append([f"{labels[d['method']]} - {labels[d['baseline']]}", d["split"], str(len(d["seeds"])), _diff(d),
                     per_seed])  # fmt: skip
    return _table(header, rows)


PAIRED_TEXT = (
    "The algorithms of a seed start from the same warm start (the same weights), so they are compared seed by seed: "
    "held-out success after RL of the method minus the baseline's on the same seed; the mean of these differences "
    "± its 95% confidence interval over the seeds (Student t), and each seed's difference."
)


def paired_answer(pairs: list[dict], labels: dict) -> list[str]:
    """One line per comparison: its paired differences per split, and whether each interval excludes zero."""
    by_pair: dict[tuple[str, str], list[dict]] = {}
    for d in pairs:
        by_pair.setdefault((d["method"], d["baseline"]), []).append(d)
    return [
        f"- **{labels[m]} vs {labels[b]} on success** (paired by seed). Held-out success after RL, {labels[m]} - "
        f"{labels[b]}, mean over seeds ± 95% CI: "
        + "; ".join(f"{d['split']} {_diff(d)} ({_verdict(d)})" for d in ds)
        + "."
        for (m, b), ds in by_pair.items()
    ]


def answer(summary: dict, labels: dict = LABELS, pairs: list[dict] = (), baselines: dict | None = None) -> list[str]:
    """The study's answer, phrased from the numbers (no hand-written claims that could go stale). The baseline is
    the first algorithm run (GRPO in the main study); `pairs`: `paired`'s per-seed differences."""
    if not summary:
        return ["No run finished: nothing to report."]
    base = next(iter(summary))
    g, name = summary[base], labels[base]

    def overlaps(a, b) -> bool:  # 95% intervals overlap: no claim of a difference
        return abs(a[0] - b[0]) <= (0 if math.isnan(a[1]) else a[1]) + (0 if math.isnan(b[1]) else b[1])

    references = (
        "Reference policies on valid_seen: "
        + ", ".join(f"{label} {reference(baselines, 'valid_seen', p)}" for p, label in REFERENCES.items())
        + "."
        if baselines
        else "Reference policies: not recorded."
    )
    lines = [
        "- **Does the baseline learn?** Held-out valid_seen success, before -> after RL (mean ± 95% CI over seeds; "
        f"then the seeds with gain >= {GAIN_TARGET}, with the exact 95% interval of that share): "
        + "; ".join(
            f"{labels[a]} {s['before_seen'][0]:.3f} -> {_pm(s['valid_seen'])} (gain {_pm(s['gain_seen'])}; "
            f"{_share(s['gain_reached'])} seeds)"
            for a, s in summary.items()
        )
        + ". "
        + (
            f"{name}'s gain is above zero at 95% confidence. "
            if g["gain_seen"][0] - (0 if math.isnan(g["gain_seen"][1]) else g["gain_seen"][1]) > 0
            else f"{name}'s gain is not distinguishable from zero at 95% confidence. "
        )
        + references
    ]
    if any(s["diverged"]["count"] for s in summary.values()):
        lines.append(
            "- **Divergence.** Seeds whose entropy blew up to near-uniform (> 5 nats) at some step (exact 95% "
            "interval of the share): " + ", ".join(f"{labels[a]} {_share(s['diverged'])}" for a, s in summary.items())
            + "."
        )  # fmt: skip
    lines.append(
        "- **Early collapse.** Entropy drop over the first quarter (negative = rises) / minimum entropy: "
        + "; ".join(f"{labels[a]} {_pm(s['early_drop'], 3)} / {_pm(s['min_entropy'], 3)}" for a, s in summary.items())
        + ". "
        + " ".join(
            f"{labels[a]} vs {name}: "
            + (
                "the intervals overlap (no difference shown)."
                if overlaps(g["min_entropy"], s["min_entropy"]) and overlaps(g["early_drop"], s["early_drop"])
                else "the intervals do not overlap."
            )
            for a, s in summary.items()
            if a != base
        )
    )
    lines.append(
        f"- **Entropy collapse** ({COLLAPSE_TEXT}: the policy went near-deterministic without learning). Seeds that "
        "collapse (exact 95% interval of the share) / first such step (mean over the seeds that collapse): "
        + "; ".join(f"{labels[a]} {_share(s['collapsed'])} / {_pm(s['collapse_step'], 1)}" for a, s in summary.items())
        + "."
    )
    lines.append(
        "- **Late instability.** Over the second half, entropy std (trend included) / std of step-to-step changes "
        "(oscillation only): "
        + "; ".join(
            f"{labels[a]} {_pm(summary[a]['late_entropy_std'], 3)} / {_pm(summary[a]['late_change_std'], 3)}"
            for a in summary
        )
        + "."
    )
    lines += paired_answer(list(pairs), labels)
    cost = {a: s["train_s"][0] for a, s in summary.items()}
    lines.append(
        "- **Cost.** Mean training wall time per run: "
        + ", ".join(f"{labels[a]} {v:.0f} s" for a, v in cost.items())
        + " (same steps, batch and lr; runs shared the CPU with each other and other jobs, so differences are noise; "
        "the loss overhead itself is measured in docs/benchmarks.md)."
    )
    return lines


_REFERENCE_SPLIT = {"before_seen": "valid_seen", "valid_seen": "valid_seen", "before_unseen": "valid_unseen",
                    "valid_unseen": "valid_unseen"}  # fmt: skip


def _cells(s: dict, columns: dict) -> list[str]:
    return [_share(s[k]) if k in SHARE_COLUMNS else _pm(s[k]) for k in columns]


def _reference_cells(baselines: dict | None, policy: str) -> list[str]:
    """A reference policy's row of the held-out table: its success in the before and after columns of each split."""
    return [
        reference(baselines, _REFERENCE_SPLIT[k], policy) if k in _REFERENCE_SPLIT else "-" for k in HELD_OUT_COLUMNS
    ]


def to_markdown(results: dict, figures: str = "study") -> str:
    """The report; `figures` is the output folder relative to the report's own folder (plots, results.json). Every
    number comes from `results["runs"]` (and the reference policies from `results["baselines"]`, "not recorded"
    where absent): the stored summary is a record of the numbers, not an input."""
    meta, runs = results["meta"], results["runs"]
    summary, pairs, baselines = aggregate(runs), paired(runs), results.get("baselines")
    setting = SETTINGS[meta.get("setting_name", "maze")]
    labels = setting.all_labels
    held_out = _table(
        ["policy", "seeds", *HELD_OUT_COLUMNS.values()],
        [[labels[a], str(s["seeds"]), *_cells(s, HELD_OUT_COLUMNS)] for a, s in summary.items()]
        + [[label, "-", *_reference_cells(baselines, p)] for p, label in REFERENCES.items()],
    )
    dynamics = _table(
        ["algo", "seeds", *DYNAMICS_COLUMNS.values()],
        [[labels[a], str(s["seeds"]), *_cells(s, DYNAMICS_COLUMNS)] for a, s in summary.items()],
    )
    shared = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in meta["overrides"].items() if k not in ("report_to",))
    errors = "".join(
        f"\n- {labels.get(r['algo'], r['algo'])} seed {r['seed']} failed: {r['error']}" for r in results["errors"]
    )
    extra = "; ".join(f"{labels[a]} `{json.dumps(setting.extra(a))}`" for a in summary if setting.extra(a)) or "none"
    per_seed = "; ".join(
        f"{labels[r['algo']]} seed {r['seed']}: {r['before']['valid_seen']:.3f} -> {r['held_out']['valid_seen']:.3f}"
        for r in sorted(runs, key=lambda r: (r["algo"], r["seed"]))
    )
    title = " vs ".join(labels[a] for a in summary)
    recipe = os.path.relpath(Path(setting.recipe).resolve(), Path(__file__).resolve().parent.parent)
    setup = setting.setup.format(**meta["warm_start"], eval_tasks=meta["eval_tasks"])
    caveats = setting.caveats.format(seeds=len(meta["seeds"]), **meta["setting"])
    scale = f"\n\n## What it would take\n\n{meta['scale']}" if meta.get("scale") else ""
    commit = f"; code: commit {meta['commit']}" if meta.get("commit") else ""
    return f"""# Study: {title} on {setting.title}

Generated by `{meta["command"]}` on {meta["date"]} ({meta["machine"]}{commit}); total wall time {meta["wall_s"]:.0f} s
({meta["jobs"]} runs at a time). Raw numbers: [{figures}/results.json]({figures}/results.json). Do not edit the tables by hand: re-run the command.
{setting.why}

## Setup
The recipe `{recipe}` with `--algo` per method, through `epo_trl.cli.train.load_config/build_trainer`
(the CLI path), all with the same overrides: {shared}; seeds {list(meta["seeds"])}. Per algorithm: {extra}. {setup}{errors}

## Results

Means ± 95% confidence interval across seeds (Student t). Shares of seeds: k/n seeds, with the exact 95% binomial
(Clopper-Pearson) interval of the share in parentheses.

### Held-out success

{chr(10).join(held_out)}

{reference_text(baselines, meta.get("baseline_k"))}

Held-out valid_seen success per run, before -> after: {per_seed}.

### Paired differences (method - baseline, seed by seed)

{PAIRED_TEXT}

{chr(10).join(paired_table(pairs, labels))}

### Training dynamics

{chr(10).join(dynamics)}

Columns: train success = mean `rollout/success_rate` over the first / last quarter of steps; entropy = TRL's `entropy`
(token mean over action tokens, nats); diverged = the entropy rose above {DIVERGED_NATS:g} nats at some step;
collapsed = entropy collapse, the policy went near-deterministic without learning:
{COLLAPSE_TEXT}
(a policy that sharpens while it learns is not counted); collapse step = the first such step (mean over the seeds
that collapse; "-" if none does); drop = entropy at step 1 minus at the end of the first quarter; entropy std,
second half = std of the per-step entropy over the second half of training (late instability, trend included);
step-to-step change std = std of H[k+1] - H[k] over the second half (oscillation without the trend).

![entropy]({figures}/entropy.png) ![success]({figures}/success.png)

![per-turn entropy]({figures}/turn_entropy.png)

## What it shows

{chr(10).join(answer(summary, labels, pairs, baselines))}

{caveats}{scale}
"""


# ----- entry point -----------------------------------------------------------------------------------------------
def _collect(raw: Path) -> tuple[list[dict], dict[str, dict], list[dict]]:
    """Finished runs, warm starts by "<mode>-<seed>", and errors, from the per-run JSON files."""
    runs, warm, errors = [], {}, []
    for f in sorted(raw.glob("*.json")):
        r = json.loads(f.read_text())
        if "error" in r:
            errors.append(r)
        elif f.name.startswith("warm-"):
            warm[f"{r['mode']}-{r['seed']}"] = r
        else:
            runs.append(r)
    for r in runs:
        r["before"] = warm[f"{r['mode']}-{r['seed']}"]["before"]
    return runs, warm, errors


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m research.study", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a test run: 1 seed, 2 steps (maze: GRPO, AEPO, EPO in step mode; coin: GRPO, EPO)",
    )
    parser.add_argument("--setting", default="maze", choices=sorted(SETTINGS),
                        help="maze: the demo's 4x4 trail maze (docs/study.md); coin: 30-turn Coin Collector games "
                        "(TextWorldExpress, needs Java; docs/study-long-horizon.md)")  # fmt: skip
    parser.add_argument("--output-dir", default=None,
                        help="results.json, PNG plots, per-run JSON (raw/) (default: docs/study, or "
                        "docs/study/long-horizon for --setting coin)")  # fmt: skip
    parser.add_argument(
        "--report",
        default=None,
        help="markdown report (default: docs/study.md or docs/study-long-horizon.md; none with --quick)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each in its own process)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2 3 4)")
    parser.add_argument("--algos", nargs="+", default=None, choices=ARMS, help=f"default: all of {ARMS}")
    parser.add_argument("--report-only", action="store_true", help="re-render the report from the per-run JSON")
    opts = parser.parse_args(argv)

    from .bench.common import git_commit, machine_info, machine_summary, setup_offline

    setup_offline()
    started = time.perf_counter()
    setting = SETTINGS[opts.setting]
    output_dir = opts.output_dir or setting.output_dir
    recipe = str(setting.recipe)
    plan = setting.quick if opts.quick else setting.plan
    overrides = {**SHARED, **(setting.quick_overrides if opts.quick else {})}
    if opts.quick and setting.quick_env_kwargs:  # env_kwargs replace the recipe's whole dict: merge into it
        import yaml

        recipe_env = yaml.safe_load(setting.recipe.read_text())["env_kwargs"]
        overrides["env_kwargs"] = {**recipe_env, **setting.quick_env_kwargs}
    recipe_script, recipe_rollout, recipe_args = _setup(overrides, "epo", 0, output_dir, recipe)
    warm_cfg = warm_settings(recipe_script)
    run_setting = {"max_steps": recipe_args.max_steps, "episodes_per_step": recipe_args.per_device_train_batch_size,
               "num_generations": recipe_args.num_generations}  # fmt: skip
    seeds = opts.seeds or list(plan["seeds"])
    algos = opts.algos or list(plan["algos"])
    modes = sorted({mode_of(a, overrides, recipe_script.rollout_mode) for a in algos})
    out = Path(output_dir)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    threads = max((os.cpu_count() or 1) // max(opts.jobs, 1), 1)
    baselines, baseline_k = None, None  # the reference policies' held-out success: recorded when the runs start
    if not opts.report_only:
        for f in raw.glob("*.json"):
            f.unlink()
        try:
            baselines, baseline_k = reference_baselines(recipe_script, recipe_rollout, plan["eval_tasks"]), BASELINE_K
        except ValueError as e:  # an env the reference policies cannot play: the report says "not recorded"
            print(f"reference policies not recorded: {e}", file=sys.stderr)
        started_info = {"time": time.time(), "seeds": seeds, "algos": algos, "baselines": baselines,
                        "baseline_k": baseline_k, "commit": git_commit()}  # fmt: skip
        (out / "started.json").write_text(json.dumps(started_info))
        done, total = [0], len(seeds) * (len(modes) + len(algos))

        def progress(what: str, result: dict) -> None:
            done[0] += 1
            if "error" in result:
                outcome = f"failed: {result['error']}"
            elif "held_out" in result:
                outcome = (
                    f"held-out success after {result['held_out']['valid_seen']:.3f}, RL {result['train_s']:.0f} s"
                )
            else:
                outcome = f"held-out success {result['before']['valid_seen']:.3f}, {result['warm_s']:.0f} s"
            print(f"[{done[0]}/{total}, {time.perf_counter() - started:.0f} s] {what}: {outcome}", flush=True)

        with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(opts.jobs, 1)) as pool:

            def warm(job):
                mode, seed = job
                spec = {"seed": seed, "mode": mode, "output_dir": os.path.join(tmp, f"warm-{mode}-{seed}"),
                        "overrides": overrides, "eval_tasks": plan["eval_tasks"], "recipe": recipe}  # fmt: skip
                result = _launch("warm", spec, threads, str(raw / f"warm-{mode}-{seed}.json"))
                progress(f"warm start ({mode} mode) seed {seed}", result)
                return {**result, "mode": mode}

            def train(job):
                algo, seed = job
                result_file = raw / f"{algo}-{seed}.json"
                mode = mode_of(algo, overrides, recipe_script.rollout_mode)
                spec = {"algo": algo, "seed": seed, "output_dir": os.path.join(tmp, f"{algo}-{seed}"),
                        "overrides": overrides, "eval_tasks": plan["eval_tasks"], "recipe": recipe,
                        "warm_dir": os.path.join(tmp, f"warm-{mode}-{seed}", "tiny-model"),
                        "extra": setting.extra(algo)}  # fmt: skip
                result = _launch("run", spec, threads, str(result_file))
                if "error" in result:
                    result_file.write_text(json.dumps(result))
                progress(f"{setting.all_labels[algo]} seed {seed}", result)
                return result

            trains = []

            def warm_then_train(job):
                # a seed's runs queue as soon as its warm start is ready: no core idles while the last warm
                # starts run (the queue is FIFO: every warm start starts first, then the runs seed by seed)
                w = warm(job)
                if "error" in w:
                    (raw / f"warm-{w['mode']}-{w['seed']}.json").write_text(json.dumps(w))
                    return
                mode, seed = job
                runs_of = [a for a in algos if mode_of(a, overrides, recipe_script.rollout_mode) == mode]
                trains.extend(pool.submit(train, (a, seed)) for a in runs_of)

            for future in [pool.submit(warm_then_train, (m, s)) for s in seeds for m in modes]:
                future.result()
            for future in list(trains):
                future.result()
    runs, warm_starts, errors = _collect(raw)
    for r in errors:
        print(f"run {r['algo']} seed {r['seed']} failed: {r['error']}", file=sys.stderr)
    info = machine_info()
    wall_s = time.perf_counter() - started
    if opts.report_only:  # an interrupted or still running study: wall time so far, from the files' times
        files = list(raw.glob("*.json"))
        start = json.loads((out / "started.json").read_text()) if (out / "started.json").exists() else {}
        first = start.get("time") or min(f.stat().st_mtime - json.loads(f.read_text()).get("warm_s", 0) for f in files)
        wall_s = max(f.stat().st_mtime for f in files) - first
        seeds, algos = start.get("seeds", seeds), start.get("algos", algos)
        # recorded when the runs started (the recipe may have changed since: never recomputed here)
        baselines, baseline_k = start.get("baselines"), start.get("baseline_k")
    previous_results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    previous = previous_results.get("meta", {})
    if opts.report_only and baselines is None and previous.get("runs") == len(runs):
        baselines, baseline_k = previous_results.get("baselines"), previous.get("baseline_k")
    if opts.report_only and previous.get("runs") == len(runs):  # the same runs: keep when and where they ran
        # (file times of a fresh clone are checkout times, not the study's)
        info = {**info, "date": previous["date"]}
        wall_s, machine, jobs = previous["wall_s"], previous["machine"], previous["jobs"]
    else:
        machine, jobs = machine_summary(info), opts.jobs
    planned = len(seeds) * len(algos)
    command = "python -m research.study" + (" --quick" if opts.quick else "")
    command += f" --setting {opts.setting}" if opts.setting != "maze" else ""
    command += f" --seeds {' '.join(map(str, seeds))}" if list(seeds) != list(plan["seeds"]) else ""
    command += f" --algos {' '.join(algos)}" if list(algos) != list(plan["algos"]) else ""
    command += f" --output-dir {output_dir}" if output_dir != setting.output_dir else ""
    command += f" --report {opts.report}" if opts.report and opts.report != setting.report else ""
    meta = {
        "command": command + ("" if len(runs) == planned else f" (partial: {len(runs)} of {planned} runs finished)"),
        "date": info["date"],
        "machine": machine,
        "jobs": jobs,
        "runs": len(runs),
        "wall_s": wall_s,
        # the code the runs ran: recorded when they started (started.json), else by an earlier rendering
        "commit": (start if opts.report_only else started_info).get("commit") or previous.get("commit"),
    }
    meta.update(
        seeds=sorted({r["seed"] for r in runs}),
        eval_tasks=plan["eval_tasks"],
        overrides=overrides,
        warm_start=warm_cfg,
        setting=run_setting,
        setting_name=opts.setting,
        labels={a: setting.all_labels[a] for a in algos},
    )
    if baselines:
        meta["baseline_k"] = baseline_k
    if opts.setting == "coin" and not opts.quick:
        meta["scale"] = scale_note(runs, run_setting["episodes_per_step"])
    results = {
        "meta": meta,
        "summary": aggregate(runs),
        "paired": paired(runs),
        "baselines": baselines,  # per held-out split: {random, walker, expert, ceiling}; None: not recorded
        "warm_starts": warm_starts,
        "runs": runs,
        "errors": errors,
    }
    results["meta"]["plots"] = plot(runs, out, meta["labels"]) if runs else []
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = opts.report or (None if opts.quick else setting.report)
    if report:
        figures = os.path.relpath(out.resolve(), Path(report).resolve().parent)
        Path(report).write_text(to_markdown(results, figures))
    print(to_markdown(results))
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
