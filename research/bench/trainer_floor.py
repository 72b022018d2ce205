"""Benchmark 7: the trainer's compute per optimizer step against its floor: TRL's path, skipping the old-logp pass,
and sharing prompt passes too.

With vLLM's importance-sampling correction (TRL's default) TRL scores every row once more in a no-grad forward for
the old log-probs; on an on-policy batch those are the training forward's detached ones, and the trainer skips the
pass (`skip_on_policy_old_logps`, tests/test_old_logp_skip.py). Rows of a forward chunk that share their prompt (a
GRPO group in trajectory mode, turn-0 rows in step mode) can run it once (`share_prompt_forward`,
tests/test_shared_prefix.py). This section counts, per optimizer step, the tokens each trainer pass runs through the
model (old-logp forward, reference forward, policy forward, backward; padded positions included, as the model
computes them; a shared prompt once) against the step's unique tokens, and times each pass: CPU
seconds of the training thread (torch runs one thread here, and on CPU autograd runs the backward in the calling
thread), which other load on a shared machine barely moves; wall seconds are in the raw records.

One EPO trainer per model (the CPU vLLM recipe, `recipes/cpu/maze_epo_vllm.yaml`, on a `key` maze the models cannot
finish, so every episode lasts `max_turns`), in a fresh process, with a real colocated CPU vLLM engine. Its optimizer
steps go round-robin through six variants, so drift on a shared machine hits all alike: step / trajectory mode
(the trainer's `rollout_func` swapped between two rollouts of the same env) x TRL's path / skip / skip + shared
prompts (the config fields flipped before the step). The first round (optimizer creation, warm-up) is not reported.

Unique tokens of a step: "rows" = the non-padding tokens of its training rows (one forward + backward over each
row once: the floor of a trainer that runs every row on its own); "prefixes" = the distinct token prefixes of all
rows (the floor of a forward that shares every common opening: a GRPO group's copies of a prompt, and step mode's
turns of one episode). **redundancy** = tokens processed by all passes ÷ minimum (forward + backward over the unique
tokens; beta = 0 here, so no reference pass).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time

from .common import md_table

# name -> model -> (rounds of the four variants, the first dropped; maze turns per episode; episodes per step = one
# GRPO group). SmolLM2's forward + backward take tens of seconds per step on a shared 2-core CPU: fewer, shorter rows.
SETTINGS = {
    "full": {"tiny": (5, 4, 4), "smollm2": (4, 2, 2)},
    "quick": {"tiny": (3, 3, 4), "smollm2": (2, 2, 2)},
    "smoke": {"tiny": (2, 2, 2)},
}
# path -> (skip_on_policy_old_logps, share_prompt_forward)
PATHS = {"trl": (False, False), "skip": (True, False), "shared": (True, True)}
PATH_NAMES = {"trl": "TRL", "skip": "skip", "shared": "skip + shared"}
VARIANTS = tuple((mode, path) for mode in ("step", "trajectory") for path in PATHS)
PASSES = ("old_logp", "reference", "forward", "backward")


def _label(mode: str, path: str) -> str:
    return f"{mode}/{path}"


def unique_prefix_tokens(rows: list[tuple[int, ...]]) -> int:
    """Distinct prefixes of `rows` (the nodes of their token trie): each row's length minus its longest common
    prefix with its neighbour in sorted order."""
    total, previous = 0, ()
    for row in sorted(rows):
        common = 0
        for a, b in zip(previous, row):
            if a != b:
                break
            common += 1
        total += len(row) - common
        previous = row
    return total


def child(model: str, rounds: int, turns: int, generations: int, output_dir: str) -> list[dict]:
    """Train one model through the six variants; per optimizer step: variant, tokens and seconds per pass."""
    import torch
    from transformers import PrinterCallback, TrainerCallback

    from epo_trl.cli.train import CPU_RECIPES, build_trainer, load_config
    from epo_trl.hardware import cpu_native_bf16
    from epo_trl.rollout import StepRollout, TrajectoryRollout

    from .common import quiet_logs

    quiet_logs()
    overrides = {
        "env_kwargs": {"size": 6, "task": "key", "distractors": 1},
        "max_turns": turns,
        "max_turn_tokens": 8,
        "tasks_per_step": 1,
        "num_generations": generations,
        "max_completion_length": 1024,  # trajectory rows hold every turn and observation
        "max_steps": rounds * len(VARIANTS),
        "learning_rate": 1e-6,
        "vllm_sync_check": False,  # its probe forward is not a training pass
        "report_to": [],
        "disable_tqdm": True,
        "output_dir": output_dir,
    }
    if model == "smollm2":
        overrides.update(model_name_or_path="smollm2-135m", bf16=cpu_native_bf16())
    script, rollout_config, args = load_config([str(CPU_RECIPES / "maze_epo_vllm.yaml")], overrides=overrides)
    script.rollout_mode = "step"
    trainer = build_trainer(script, rollout_config, args)
    trainer.remove_callback(PrinterCallback)
    step_rollout = trainer.rollout_func
    rollouts = {"step": step_rollout, "trajectory": TrajectoryRollout(step_rollout.factory, rollout_config)}
    assert isinstance(step_rollout, StepRollout)
    records: list[dict] = []
    current: dict = {}

    forward = trainer._get_per_token_logps_and_entropies

    def timed_forward(model_, input_ids, attention_mask, *rest, **kwargs):
        t0, c0, before = time.perf_counter(), time.thread_time(), trainer.forward_tokens
        out = forward(model_, input_ids, attention_mask, *rest, **kwargs)
        seconds, wall = time.thread_time() - c0, time.perf_counter() - t0
        ran = trainer.forward_tokens - before  # positions the model ran: a shared prompt once
        if torch.is_grad_enabled() and kwargs.get("compute_entropy"):
            name = "forward"
            keep = attention_mask.bool()
            current["rows"] += [tuple(ids[m].tolist()) for ids, m in zip(input_ids, keep)]
            current["row_tokens"] += int(keep.sum())
            current["pending_backward"] = ran  # the backward runs back through the same positions
        elif torch.isnan(out[0]).all():  # the placeholder of the skipped old-logp pass: nothing ran
            return out
        else:
            name = "old_logp" if model_ is trainer.model else "reference"
        current["tokens"][name] += ran
        current["seconds"][name] += seconds
        current["wall"][name] += wall
        return out

    trainer._get_per_token_logps_and_entropies = timed_forward
    backward = trainer.accelerator.backward

    def timed_backward(loss, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        backward(loss, **kwargs)  # on CPU, autograd runs the backward in the calling thread
        current["seconds"]["backward"] += time.thread_time() - c0
        current["wall"]["backward"] += time.perf_counter() - t0
        current["tokens"]["backward"] += current.pop("pending_backward")

    trainer.accelerator.backward = timed_backward
    play_seconds = [0.0]
    for rollout in rollouts.values():
        play = rollout.play

        def timed_play(*a, _play=play, **kw):
            t0 = time.perf_counter()
            try:
                return _play(*a, **kw)
            finally:
                play_seconds[0] += time.perf_counter() - t0

        rollout.play = timed_play

    class Rounds(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            mode, path = VARIANTS[state.global_step % len(VARIANTS)]
            trainer.rollout_func = rollouts[mode]
            trainer.args.skip_on_policy_old_logps, trainer.args.share_prompt_forward = PATHS[path]
            current.clear()
            current.update(variant=_label(mode, path), rows=[], row_tokens=0, step=state.global_step)
            current["tokens"] = dict.fromkeys(PASSES, 0)
            current["seconds"] = dict.fromkeys((*PASSES, "optimizer"), 0.0)
            current["wall"] = dict.fromkeys((*PASSES, "optimizer"), 0.0)
            play_seconds[0] = 0.0
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, *_, **__):
            self.opt0, self.opt_cpu0 = time.perf_counter(), time.thread_time()

        def on_optimizer_step(self, *_, **__):
            current["seconds"]["optimizer"] += time.thread_time() - self.opt_cpu0
            current["wall"]["optimizer"] += time.perf_counter() - self.opt0

        def on_step_end(self, *_, **__):
            rows = current.pop("rows")
            record = {k: v for k, v in current.items() if k != "pending_backward"}
            record.update(
                num_rows=len(rows),
                prefix_tokens=unique_prefix_tokens(rows),
                step_s=time.perf_counter() - self.t0,
                rollout_s=play_seconds[0],
            )
            records.append(record)

    trainer.add_callback(Rounds())
    try:
        trainer.train()
    finally:
        for rollout in rollouts.values():
            rollout.close()
    return records


def _summary(records: list[dict]) -> dict:
    """Per variant: means over its steps of tokens and seconds per pass, the trainer's time and the redundancy."""
    out = {}
    for mode, path in VARIANTS:
        kept = [r for r in records if r["variant"] == _label(mode, path)]
        if not kept:
            continue

        def mean(get, kept=kept):
            return statistics.fmean(get(r) for r in kept)

        row = {
            "mode": mode,
            "path": path,
            "steps": len(kept),
            "rows": mean(lambda r: r["num_rows"]),
            "row_tokens": mean(lambda r: r["row_tokens"]),
            "prefix_tokens": mean(lambda r: r["prefix_tokens"]),
            "tokens": {p: mean(lambda r, p=p: r["tokens"][p]) for p in PASSES},
            "seconds": {p: mean(lambda r, p=p: r["seconds"][p]) for p in (*PASSES, "optimizer")},
            "wall": {p: mean(lambda r, p=p: r["wall"][p]) for p in (*PASSES, "optimizer")},
            "rollout_s": mean(lambda r: r["rollout_s"]),
            "step_s": mean(lambda r: r["step_s"]),
        }
        processed = sum(row["tokens"].values())
        row["redundancy_rows"] = processed / (2 * row["row_tokens"])
        row["redundancy_prefixes"] = processed / (2 * row["prefix_tokens"])
        row["trainer_s"] = sum(row["seconds"].values())
        # steps differ in their rows (each variant plays its own episodes): compare per unique row token
        row["trainer_ms_per_1k_tokens"] = 1e6 * mean(lambda r: sum(r["seconds"].values()) / r["row_tokens"])
        out[_label(mode, path)] = row
    for mode, path in VARIANTS:
        row, trl = out.get(_label(mode, path)), out.get(_label(mode, "trl"))
        if row and trl and path != "trl":
            row["trainer_time_change"] = row["trainer_ms_per_1k_tokens"] / trl["trainer_ms_per_1k_tokens"] - 1
    return out


def run(quick: bool = False, smoke: bool = False) -> dict:
    from epo_trl.hardware import cpu_native_bf16

    settings = SETTINGS["smoke" if smoke else "quick" if quick else "full"]
    models = {"tiny": "tiny (hidden 64, fp32)"}
    if "smollm2" in settings:
        try:
            from epo_trl.models.smollm2 import smollm2_gguf

            smollm2_gguf()
            models["smollm2"] = f"SmolLM2-135M-Instruct ({'bf16 autocast' if cpu_native_bf16() else 'fp32'})"
        except (ImportError, FileNotFoundError):
            pass
    results = {"models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, label in models.items():
            rounds, turns, generations = settings[name]
            # a fresh process per model: one colocated vLLM engine per process, freed with it
            cmd = [sys.executable, "-m", "research.bench.trainer_floor", name, str(rounds), str(turns),
                   str(generations), f"{tmp}/{name}"]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"trainer_floor {name} failed:\n{proc.stderr[-4000:]}")
            records = json.loads(proc.stdout.strip().splitlines()[-1])
            summary = _summary(records[len(VARIANTS) :] or records)
            results["models"][label] = {
                "turns": turns,
                "episodes": generations,
                "records": records,
                "summary": summary,
            }
    return results


def to_markdown(results: dict) -> str:
    header = ["model", "mode", "path", "rows", "unique tokens (rows / prefixes)", "old-logp / fwd / bwd tokens",
              "redundancy (rows)", "redundancy (prefixes)", "old-logp s", "forward s", "backward s", "optimizer s",
              "trainer s/step", "trainer s / turn", "trainer ms / 1k tokens", "vs TRL's path", "rollout s"]  # fmt: skip
    table, verdicts = [], []
    for model, result in results["models"].items():
        turns = result["turns"] * result["episodes"]  # every episode lasts max_turns on this maze
        for r in result["summary"].values():
            t, s = r["tokens"], r["seconds"]
            change = r.get("trainer_time_change")
            table.append([
                model, r["mode"], PATH_NAMES[r["path"]], f"{r['rows']:.0f}",
                f"{r['row_tokens']:.0f} / {r['prefix_tokens']:.0f}",
                f"{t['old_logp']:.0f} / {t['forward']:.0f} / {t['backward']:.0f}",
                f"**{r['redundancy_rows']:.2f}**", f"{r['redundancy_prefixes']:.2f}", f"{s['old_logp']:.3f}",
                f"{s['forward']:.3f}", f"{s['backward']:.3f}", f"{s['optimizer']:.3f}", f"{r['trainer_s']:.3f}",
                f"{r['trainer_s'] / turns:.3f}",
                f"{r['trainer_ms_per_1k_tokens']:.1f}", "" if change is None else f"**{100 * change:+.1f}%**",
                f"{r['rollout_s']:.2f}",
            ])  # fmt: skip
            if change is not None:
                verdicts.append(
                    f"- {model}, {r['mode']} mode, {PATH_NAMES[r['path']]}: trainer time per token {100 * change:+.1f}% "
                    f"vs TRL's path (target <= -15%: {'met' if change <= -0.15 else 'NOT met'}); redundancy "
                    f"{r['redundancy_rows']:.2f} per row, {r['redundancy_prefixes']:.2f} over shared prefixes"
                )
    for model, result in results["models"].items():
        verdicts += _guidance(model, result)
    notes = [
        f"- {model}: {res['turns']} turns per episode, {res['episodes']} episodes (one GRPO group) per step; means over "
        f"{min(r['steps'] for r in res['summary'].values())} steps per variant after the first round."
        for model, res in results["models"].items()
    ]
    return "\n".join([*notes, "", md_table(header, table), "", *verdicts])


def _guidance(model: str, result: dict) -> list[str]:
    """Which mode costs the trainer what per episode turn on the default path, what sharing adds to the skip, and
    trajectory mode's redundancy against its target."""
    summary, turns = result["summary"], result["turns"] * result["episodes"]
    step, traj = summary.get("step/shared"), summary.get("trajectory/shared")
    if not (step and traj):
        return []
    per_turn = {mode: summary[f"{mode}/shared"]["trainer_s"] / turns for mode in ("step", "trajectory")}

    def sharing(mode: str) -> str:
        skip = summary.get(f"{mode}/skip")
        change = summary[f"{mode}/shared"]["trainer_ms_per_1k_tokens"] / skip["trainer_ms_per_1k_tokens"] - 1
        return f"{100 * change:+.1f}% in {mode} mode"

    redundancy = traj["redundancy_prefixes"]
    return [
        f"- {model}, defaults (skip + shared): the trainer spends {per_turn['step']:.3f} s per episode turn in step "
        f"mode, {per_turn['trajectory']:.3f} s in trajectory mode ({per_turn['step'] / per_turn['trajectory']:.1f}x); "
        f"sharing prompts on top of the skip: {sharing('trajectory')}, {sharing('step')} (time per token); "
        f"trajectory redundancy over shared prefixes {redundancy:.2f} (target <= 1.2: "
        f"{'met' if redundancy <= 1.2 else 'NOT met'})"
    ]


if __name__ == "__main__":
    from .common import setup_offline

    setup_offline()
    print(json.dumps(child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
