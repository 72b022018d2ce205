"""`python -m research.study_llm`: GRPO vs EPO on SmolLM2-135M-Instruct (the real-model demo), several seeds.

Each run is `epo-trl demo --llm --algo ALGO --seed SEED` (recipes/cpu/demo_llm.yaml) in its own process, so the
study is the demo's path and nothing else. Per seed, the first algorithm's run builds the SFT warm start
(`<run>/warm-start-model`, TRL's SFTTrainer); the others start from a copy of it, so every algorithm of a seed
starts from the same weights and has the same held-out "before". Writes `<output-dir>/results.json`
(`{"model", "wall_s", "runs": [{"algo", "seed", "before", "after", "episodes", ...}]}`, before = after the warm
start, after = after RL, held-out `valid_seen`), each run's `final_metrics.json` under `raw/`, and the report
(docs/study/smollm2.md). Runs are sequential: one run already uses both cores of a laptop-class CPU.
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
from pathlib import Path

from epo_trl.stats import paired_differences, share_of

from .study import (
    PAIRED_TEXT,
    REFERENCES,
    _mean_ci,
    _pm,
    _share,
    _table,
    comparisons,
    paired_answer,
    paired_table,
    reference,
    reference_text,
)

METHODS = ("grpo", "epo-base", "epo", "aepo")
LABELS = {"grpo": "GRPO", "epo-base": "EPO-Base", "epo": "EPO (make demo-llm)", "aepo": "AEPO"}
MODEL = "SmolLM2-135M-Instruct"
GAIN_TARGET = 0.20  # the real-model demo's bar: held-out success after RL - after the warm start


def run_one(algo: str, seed: int, run_dir: Path, warm_from: Path | None, extra: list[str]) -> dict:
    """`epo-trl demo --llm` for (algo, seed) in `run_dir` (its console in `console.log`); its final metrics."""
    if warm_from is not None:  # resolve_model reuses a warm-start-model folder that is already there
        shutil.copytree(warm_from, run_dir / "warm-start-model")
    cmd = [sys.executable, "-m", "epo_trl", "demo", "--llm", "--algo", algo, "--seed", str(seed),
           "--output-dir", str(run_dir), *extra]  # fmt: skip
    with open(run_dir / "console.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (run_dir / "console.log").read_text().strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"algo": algo, "seed": seed, "error": tail[0]}
    return json.loads((run_dir / "final_metrics.json").read_text())


def record(m: dict) -> dict:
    """One run's row of results.json from its final_metrics.json."""
    before, after = m["eval_before"]["valid_seen"], m["eval_after"]["valid_seen"]
    zero = (m.get("eval_zero_shot") or {}).get("valid_seen")
    last = m["train_last_step"]
    return {
        "algo": m["algo"],
        "seed": m["seed"],
        "before": before["success_rate"],
        "after": after["success_rate"],
        "episodes": after["episodes"],
        "zero_shot": zero["success_rate"] if zero else None,
        "valid_actions": {
            "zero_shot": 1 - zero["invalid_rate"] if zero else None,
            "before": 1 - before["invalid_rate"],
            "after": 1 - after["invalid_rate"],
        },  # fmt: skip
        "valid_unseen": {
            "before": m["eval_before"]["valid_unseen"]["success_rate"],
            "after": m["eval_after"]["valid_unseen"]["success_rate"],
        },  # fmt: skip
        "train_success": {
            "first_quarter": m["train_success_first_quarter"],
            "last_quarter": m["train_success_last_quarter"],
        },  # fmt: skip
        "entropy": {"first": m["train_first_step"].get("entropy"), "last": last.get("entropy")},
        "entropy_per_turn": m["entropy_per_turn"],
        "steps": m["global_step"],
        "warm_start_s": m["warm_start_seconds"],
        "train_s": m["train_seconds"],
        "total_s": m["total_seconds"],
    }


def summarize(runs: list[dict]) -> dict:
    """Per algorithm: mean ± 95% CI over seeds of the report's columns."""
    out: dict[str, dict] = {}
    for algo in METHODS:
        rs = [r for r in runs if r["algo"] == algo]
        if not rs:
            continue
        out[algo] = {
            "seeds": len(rs),
            "before": _mean_ci([r["before"] for r in rs]),
            "after": _mean_ci([r["after"] for r in rs]),
            "gain": _mean_ci([r["after"] - r["before"] for r in rs]),
            "gain_reached": sum(r["after"] - r["before"] >= GAIN_TARGET for r in rs),
            "valid_unseen_after": _mean_ci([r["valid_unseen"]["after"] for r in rs]),
            "valid_actions_after": _mean_ci([r["valid_actions"]["after"] for r in rs]),
            "entropy_first": _mean_ci([r["entropy"]["first"] for r in rs]),
            "entropy_last": _mean_ci([r["entropy"]["last"] for r in rs]),
            "train_s": _mean_ci([r["train_s"] for r in rs]),
        }
    return out


def run_baselines(raw: Path) -> tuple[dict | None, int | None]:
    """The reference policies' held-out success the runs recorded (`final_metrics.json`'s "baselines": the demo plays
    them on the same tasks with the same turn limit) and their episodes per task; (None, None) for runs that predate
    them. Every run of a recipe plays the same tasks with the same seed, so any run's numbers are the study's."""
    from epo_trl.cli.demo import REFERENCE_SAMPLES

    for path in sorted(raw.glob("*.json")):
        reference = json.loads(path.read_text()).get("baselines")
        if reference:
            return reference, REFERENCE_SAMPLES
    return None, None


def margins(runs: list[dict], baselines: dict | None) -> list[str]:
    """Per run: the gain over its warm start and the margin over the best reference policy that does not know the
    answer (`cli.demo.best_non_expert`), on `valid_seen`, and whether both reach GAIN_TARGET (the demo's bar)."""
    if not baselines:
        return []
    from epo_trl.cli.demo import best_non_expert

    name, best = best_non_expert(baselines["valid_seen"])
    lines, met = [], 0
    for r in sorted(runs, key=lambda r: (METHODS.index(r["algo"]), r["seed"])):
        gain, margin = r["after"] - r["before"], r["after"] - best
        met += gain >= GAIN_TARGET and margin >= GAIN_TARGET
        lines.append(f"{LABELS[r['algo']]} seed {r['seed']}: gain {gain:+.3f}, over the {name} {margin:+.3f}")
    return [
        f"- Against the bar (held-out `valid_seen` after RL at least {GAIN_TARGET} above both the warm start and the "
        f"best policy that learns nothing, the {name} at {best:.3f}): {_share(share_of(met, len(runs)))} runs reach "
        f"both. " + "; ".join(lines) + "."
    ]


def paired(runs: list[dict]) -> list[dict]:
    """Per comparison (`study.comparisons`: every algorithm vs the first, EPO vs EPO-Base) and held-out split: the
    per-seed differences in held-out success after RL, and their mean ± 95% t interval. The algorithms of a seed
    start from the same warm start."""
    after = {"valid_seen": lambda r: r["after"], "valid_unseen": lambda r: r["valid_unseen"]["after"]}
    algos = [a for a in METHODS if any(r["algo"] == a for r in runs)]
    out = []
    for method, base in comparisons(algos):
        for split, value in after.items():
            per_seed = [{r["seed"]: value(r) for r in runs if r["algo"] == a} for a in (method, base)]
            out.append({"method": method, "baseline": base, "split": split, **paired_differences(*per_seed)})
    return out


def to_markdown(results: dict, figures: str) -> str:
    summary, runs, baselines = summarize(results["runs"]), results["runs"], results.get("baselines")
    head = ["algo", "seeds", "before RL", "after RL", "gain", f"share of seeds with gain >= {GAIN_TARGET}",
            "valid_unseen after", "valid actions after", "entropy step 1", "entropy last step", "RL s"]  # fmt: skip
    rows = [
        [
            LABELS[algo],
            str(s["seeds"]),
            _pm(s["before"]),
            _pm(s["after"]),
            _pm(s["gain"]),
            _share(share_of(s["gain_reached"], s["seeds"])),
            _pm(s["valid_unseen_after"]),
            _pm(s["valid_actions_after"]),
            _pm(s["entropy_first"]),
            _pm(s["entropy_last"]),
            _pm(s["train_s"], 0),
        ]
        for algo, s in summary.items()
    ]
    for policy, label in REFERENCES.items():  # a reference policy does not train: the same success before and after
        seen, unseen = reference(baselines, "valid_seen", policy), reference(baselines, "valid_unseen", policy)
        rows.append([label, "-", seen, seen, "-", "-", unseen, "-", "-", "-", "-"])
    per_run = [
        [
            LABELS[r["algo"]],
            str(r["seed"]),
            f"{r['zero_shot']:.3f}",
            f"{r['before']:.3f}",
            f"{r['after']:.3f}",
            f"{r['after'] - r['before']:+.3f}",
            f"{r['valid_actions']['zero_shot']:.3f} / "
            f"{r['valid_actions']['before']:.3f} / {r['valid_actions']['after']:.3f}",
            f"{r['train_success']['first_quarter']:.3f} -> {r['train_success']['last_quarter']:.3f}",
            f"{r['warm_start_s']:.0f}",
            f"{r['train_s']:.0f}",
            f"{r['total_s']:.0f}",
        ]
        for r in sorted(runs, key=lambda r: (r["seed"], METHODS.index(r["algo"])))
    ]
    for policy, label in REFERENCES.items():
        seen = reference(baselines, "valid_seen", policy)
        per_run.append([label, "-", seen, seen, seen, "-", "-", "-", "-", "-", "-"])
    per_run_head = ["algo", "seed", "zero-shot", "before RL", "after RL", "gain", "valid actions", "train success",
                    "warm s", "RL s", "total s"]  # fmt: skip
    pairs = paired(runs)
    errors = "".join(f"\n- {r['algo']} seed {r['seed']} failed: {r['error']}" for r in results.get("errors", []))
    errors += "".join(
        f"\n- {r['algo']} seed {r['seed']} failed once and was run again (`--append`): {r['error']}"
        for r in results.get("rerun", [])
    )
    commit = f"; code: commit {results['commit']}" if results.get("commit") else ""
    notes = f"\n\nNote on this run: {results['notes']}" if results.get("notes") else ""  # what the JSON cannot say
    return f"""# Study: {" vs ".join(LABELS[a] for a in summary)} on {results["model"]}

Generated by `{results["command"]}` on {results["date"]} ({results["machine"]}{commit}); total wall time
{results["wall_s"]:.0f} s, runs one at a time. Raw numbers: [{figures}/results.json]({figures}/results.json). Do not
edit the tables by hand: re-run the command.

## Setup
Every run is `epo-trl demo --llm --algo ALGO --seed SEED`: the recipe `recipes/cpu/demo_llm.yaml` (why each value:
[quickstart](../quickstart.md#4-a-real-model-smollm2-135m-instruct)), {results["model"]} fully fine-tuned with bf16
autocast on CPU, rollouts on vLLM (CPU build). Per seed, one SFT warm start (TRL's `SFTTrainer` on the expert's
actions, then on a noisy demonstrator's) is shared by every algorithm. Held-out success = the first
{runs[0]["episodes"] if runs else "?"} tasks of `valid_seen` (mazes unseen in training, by content), one episode each, sampled at
temperature 1 on the trainer's vLLM engine: zero-shot (the pretrained model), before RL (after the warm start),
after RL.{errors}{notes}

## Results

Means ± 95% confidence interval across seeds (Student t). Shares of seeds: k/n seeds, with the exact 95% binomial
(Clopper-Pearson) interval of the share in parentheses. Held-out success on `valid_seen` unless named.

{chr(10).join(_table(head, rows))}

{reference_text(baselines, results.get("baseline_k"))}

Per run (valid actions = turns with a well-formed, admissible `<action>`: zero-shot / before / after RL; train
success = mean `rollout/success_rate` over the first -> last quarter of steps; seconds: warm start incl. model
conversion and engine start, RL, whole run with the three evaluations):

{chr(10).join(_table(per_run_head, per_run))}

### Paired differences (method - baseline, seed by seed)

{PAIRED_TEXT}

{chr(10).join(paired_table(pairs, LABELS))}

## What it shows

{chr(10).join(answer(summary, runs, pairs) + margins(runs, baselines))}
"""


def answer(summary: dict, runs: list[dict], pairs: list[dict] = ()) -> list[str]:
    """Sentences phrased from the numbers only; `pairs`: `paired`'s per-seed differences."""
    lines = []
    befores = {}
    for r in runs:
        befores.setdefault(r["seed"], []).append(r["before"])
    repeated = {seed: b for seed, b in befores.items() if len(b) > 1}
    if repeated:
        spread = max(max(b) - min(b) for b in repeated.values())
        worst = max(repeated.values(), key=lambda b: max(b) - min(b))
        p = statistics.fmean(worst)
        lines.append(
            '- The algorithms of a seed start from the same weights, but each run measures its own "before" (64 '
            f"episodes sampled at temperature 1): those measurements differ by up to {spread:.3f} within a seed "
            f"({', '.join(f'{v:.3f}' for v in worst)}), against a binomial standard error of "
            f"{math.sqrt(p * (1 - p) / runs[0]['episodes']):.3f}. Gains are each run's after minus its own before."
        )
    for algo, s in summary.items():
        low, high = s["gain"][0] - s["gain"][1], s["gain"][0] + s["gain"][1]
        verdict = (
            "one seed: no interval"
            if math.isnan(s["gain"][1])
            else "above zero at 95% confidence"
            if low > 0
            else "not distinguishable from zero at 95% confidence"
            if high >= 0
            else "below zero at 95% confidence"
        )
        lines.append(
            f"- {LABELS[algo]}: held-out success {s['before'][0]:.3f} -> {s['after'][0]:.3f}, gain {_pm(s['gain'])} "
            f"({verdict}); {_share(share_of(s['gain_reached'], s['seeds']))} seeds gain >= {GAIN_TARGET}."
        )
    return lines + paired_answer(list(pairs), LABELS)


def run_study(opts, out: Path, argv: list[str] | None) -> dict:
    """Every (seed, algo) run in turn; results.json rewritten after each."""
    from .bench.common import git_commit, machine_summary

    args = list(sys.argv[1:] if argv is None else argv)
    if "--warm-dir" in args:  # a local folder: not for the report
        args[args.index("--warm-dir") + 1] = "WARM_DIR"
    command = " ".join(["python -m research.study_llm", *args])
    results = {"model": MODEL, "wall_s": 0.0, "command": command, "date": time.strftime("%Y-%m-%d"),
               "machine": machine_summary(), "commit": git_commit(), "runs": [], "errors": []}  # fmt: skip
    if opts.append:
        commit = results["commit"]
        results = json.loads((out / "results.json").read_text())
        results["command"] += f"; then {command}"
        if results.get("commit") != commit:
            results["commit"] = f"{results.get('commit', 'not recorded')}, then {commit}"
    runs, wall, started = results["runs"], results["wall_s"], time.perf_counter()
    done = {(r["algo"], r["seed"]) for r in runs}
    # a failed pair runs again; its failure stays on record ("rerun")
    results.setdefault("rerun", []).extend(e for e in results["errors"] if (e["algo"], e["seed"]) not in done)
    results["errors"] = errors = [e for e in results["errors"] if (e["algo"], e["seed"]) in done]

    def save() -> None:  # after every run: an interrupted study keeps what finished (--report-only, --append)
        results["wall_s"] = round(wall + time.perf_counter() - started, 1)
        (out / "results.json").write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        warm_dir = Path(opts.warm_dir or tmp)
        for seed in opts.seeds:
            warm = warm_dir / f"warm-{seed}"
            for algo in opts.algos:
                if (algo, seed) in done:
                    continue
                run_dir = Path(tmp) / f"{algo}-{seed}"
                run_dir.mkdir()
                shared = warm.exists()  # the seed's warm start and zero-shot number come from its first run
                extra = ["--quick"] * opts.quick + ["--no-zero-shot"] * shared
                m = run_one(algo, seed, run_dir, warm if shared else None, extra)
                if "error" in m:
                    errors.append(m)
                    print(f"{algo} seed {seed}: failed: {m['error']}", flush=True)
                    save()
                    continue
                if not shared:
                    shutil.copytree(run_dir / "warm-start-model", warm)
                m["plots"] = [os.path.relpath(p, run_dir) for p in m["plots"]]  # the run folder is temporary
                (out / "raw" / f"{algo}-{seed}.json").write_text(json.dumps(m, indent=1))
                row = record(m)
                first = next((r for r in runs if r["seed"] == seed and r["zero_shot"] is not None), None)
                if row["zero_shot"] is None and first is not None:
                    row["zero_shot"], row["valid_actions"]["zero_shot"] = (
                        first["zero_shot"],
                        first["valid_actions"]["zero_shot"],
                    )
                runs.append(row)
                save()
                print(f"[{time.perf_counter() - started:.0f} s] {algo} seed {seed}: held-out {row['before']:.3f} -> "
                      f"{row['after']:.3f} ({row['after'] - row['before']:+.3f}), RL {row['train_s']:.0f} s", flush=True)  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.study_llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algos", nargs="+", default=["epo", "grpo"], choices=METHODS,
                        help="the first one builds each seed's warm start")  # fmt: skip
    parser.add_argument("--output-dir", default="docs/study/smollm2", help="results.json and raw/ per-run metrics")
    parser.add_argument("--report", default="docs/study/smollm2.md", help="the markdown report ('' = none)")
    parser.add_argument("--quick", action="store_true", help="each run is `demo --llm --quick` (a test run)")
    parser.add_argument("--report-only", action="store_true", help="re-render the report from results.json")
    parser.add_argument("--append", action="store_true",
                        help="add to results.json: keep its runs, (re)run only the (algo, seed) pairs it lacks")  # fmt: skip
    parser.add_argument("--warm-dir", default=None,
                        help="where each seed's warm start is kept (warm-SEED/) and reused when present; default: "
                        "a temporary folder")  # fmt: skip
    opts = parser.parse_args(argv)
    from .bench.common import setup_offline

    setup_offline()

    out = Path(opts.output_dir)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if opts.report_only:
        results = json.loads((out / "results.json").read_text())
    else:
        results = run_study(opts, out, argv)
    if not results.get("baselines"):
        results["baselines"], results["baseline_k"] = run_baselines(raw)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    if opts.report:
        figures = os.path.relpath(out, Path(opts.report).parent)
        Path(opts.report).write_text(to_markdown(results, figures))
        print(f"report: {opts.report}")
    print(json.dumps(summarize(results["runs"]), indent=1))
    return 0 if results["runs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
