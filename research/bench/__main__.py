"""`python -m research.bench` (`make bench`): run the benchmark sections and regenerate docs/benchmarks.md whole.

    python -m research.bench [--quick] [--sections loss_overhead rollout_efficiency ...] [--output docs/benchmarks.md]
    python -m research.bench --sections loss_overhead --device cuda     # the bf16 ~0.5B run, on a GPU
    python -m research.bench --sections tool_race --update              # re-run one section, keep the others
    python -m research.bench --report-only                              # re-render the report from <output>.json

Raw numbers go next to the report (`<output>.json`). Every section is a module with `run(quick) -> dict` and
`to_markdown(results) -> str`. With `--update` the sections come from different runs (days, machines, code), so
`sections_measured` in the .json holds, per section, when, on what and at which commit it was measured: {"date"
(UTC), "run" (the command), "commit" (short hash, "+dirty" with uncommitted changes, "unknown" outside a checkout),
"machine": {"cpu", "cores", "torch_threads", "ram_gib", "cuda", "bf16_native"}, "software": {"python", "torch",
"transformers", "trl", "vllm"}}; the report shows it as a **Measured** line under each section heading.

The "GPU (device)" section comes from `gpu_check.json` beside the report (`python -m research.bench.gpu_check`,
`make gpu-check`), folded in by every run, `--report-only` too; without that file the section says how to run it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from .common import git_commit, machine_info, run_record, setup_offline, utc_now

SECTIONS = {
    "loss_overhead": "1. Loss overhead: EPOTrainer vs GRPOTrainer (with and without the entropy bonus)",
    "rollout_efficiency": "2. Rollout engine efficiency",
    "env_throughput": "3. Environment throughput",
    "turn_scaling": "4. Cost vs number of turns",
    "vllm_cpu": "5. Real vLLM on CPU: rollout engine, vs HF generate, weight sync",
    "tool_race": "6. Our lockstep engine vs TRL's tool-calling loop (environment_factory)",
    "trainer_floor": "7. Trainer compute per step vs its floor: TRL's path, skipping the old-logp pass, sharing prompts",
    "remote_envs": "8. Environments on other machines: OpenEnv servers vs a local process pool",
    "sync_separation": "9. Weight-sync probe: a stale engine vs numerical noise (real vLLM on CPU, colocate and server)",
}

HOW_TO_READ = {
    "loss_overhead": """Three variants compute `compute_loss` + backward on the same model and the same multi-turn batch
(8 rows, 64 prompt + 256 completion tokens, 4 turns separated by observation tokens): plain GRPO (no entropy term),
GRPO + TRL's built-in entropy bonus (`entropy_coef=0.001`, i.e. EPO-Base) and EPO (the same bonus + the smoothing
hinge, with a live reference for every turn, and the per-turn history). **EPO's own overhead is EPO / bonus**
(targets: time <= 1.03, memory <= 1.02). EPO / GRPO also includes back-propagating an entropy term through the
full-vocabulary softmax, a cost every entropy-regularised method pays (largest where the LM head dominates, as
in the 32k-vocab row). Step time = median over interleaved repetitions in one process; peak memory = peak RSS
increase during the steps in a fresh subprocess per variant (model loading excluded). Tiny CPU models give
milliseconds and megabytes, so a few percent can be timing noise.""",
    "rollout_efficiency": """A maze rollout (step and trajectory mode, lenient parsing, a 4x4 `key` maze the random
model cannot finish) with `HFBackend` on a tiny random model, vs the same backend replaying exactly the same
`generate` calls (same prompts, same seed, so the same tokens) with nothing around them. **ratio = rollout tok/s ÷
direct tok/s (target >= 0.95)**. Breakdown of the rollout's wall time: `gen` = time inside `backend.generate`,
`env` = env resets/steps (thread pool), `prompt render` = building and tokenising prompts (chat template),
`other` = the rest of the engine (decoding, parsing, bookkeeping). With a tiny model generation is cheap, so
this is a worst case for the engine's relative overhead; with a real model `gen` dominates even more.""",
    "env_throughput": """Environment steps per second through the rollout's env pools with 1, 2 and 4 workers: threads
(ALFWorld behind one lock, its TextWorld parser is not thread-safe) vs worker processes (one message per worker per
turn); each turn steps 4 episodes (`project_action` + `step` + admissible actions), resets untimed; plus worker
start-up per start method. ScienceWorld `lean` = the adapter's `step`; `full` = lean step + `admissible_actions()`
every step; `package` = the `scienceworld` package's own `step` (rebuilds the valid-action list each call).
TextWorldExpress = Coin Collector, 11 rooms with doors, a random admissible action every step (one JVM per env).
"vs 1 env" is the aggregate speedup; on a 2-core machine, more than ~2x is not possible, and the JVMs' own GC and
JIT threads compete for the same cores.""",
    "turn_scaling": """One EPOTrainer optimizer step (4 episodes = one GRPO group, lenient parsing, 6x6 `key` maze the random
policy cannot finish, so every episode lasts `max turns`) timed as rollout (generation + env + prompt work) and
training (forward/backward/optimizer on the rows). The first step of each run (optimizer creation, warm-up) is
dropped. Step mode trains one row per turn with a bounded prompt, so its cost grows about linearly with turns;
trajectory mode trains one row per episode whose length grows with turns (attention over a longer context, and
generation with a growing prompt). Trajectory mode runs twice: with the HF backend re-prefilling the conversation
every turn, and with KV reuse across turns (`KVCacheHFBackend`, the trainer default), whose prefill tokens only grow
with the new tokens. The last column compares step time growth with turn growth.""",
    "vllm_cpu": """vLLM's own CPU build (`vllm-cpu` 0.31, what `make test` installs), one engine in this process
built as TRL's colocate mode builds it, prefix caching on. **engine ÷ vLLM** = our rollout engine's generated tok/s on
vLLM ÷ vLLM's own batched `generate` replaying exactly the rollout's calls (same prompts, same order; sampled tokens
differ, so it is a rate ratio) — target >= 0.95. **vLLM ÷ HF**: the same trajectory-mode rollout on HF `generate`
(re-prefilling every turn) and with KV reuse across turns (`KVCacheHFBackend`). **push** = one weight sync into the
engine (`push_cpu_colocate`: vLLM's reload of every tensor + the tied LM head re-pack); **probe check** = the check
EPOTrainer runs after every push (the probe text scored by the engine + one trainer forward); **probe mean abs
Δ log p** = its mean |engine - trainer| log-prob after perturbed weights were pushed.""",
    "tool_race": """One GRPO generation step (`_generate_and_score_completions`: rollout, padding, scoring) of one group on the
maze, three ways on the same model: our engine in step mode and in trajectory mode (`rollout_func`, HF generate
re-prefilling each turn), and TRL's own tool loop (`environment_factory=trl_environment(factory)`, the Qwen2.5
tool-calling template, whose system prompt carries the tool's JSON schema). The episodes are identical: each turn's
text is forced through HF `generate` on the real model (a logits processor allows only the scripted token, so the
compute is that of generating those tokens), the agent acts `look` every turn, and every episode lasts exactly the
same number of actions. An action costs 7 generated tokens in our `<action>` format and ~33 as a JSON tool call;
TRL's loop needs one more generation per episode, in which the agent stops calling tools. **prefill tokens** = prompt
tokens run through the model over all generate calls; **vs TRL wall** = TRL's wall time per step ÷ this loop's.
Every loop runs in a fresh process; median of the reps after a warm-up step. vLLM is not raced: the forcing is an HF
logits processor, and no vLLM equivalent was built.""",
    "trainer_floor": """What the trainer runs through the model per optimizer step, pass by pass, with vLLM's importance-sampling
correction on (TRL's default), three ways: **TRL**'s path (an extra no-grad **old-logp** forward over every row);
**skip**: that pass skipped on on-policy batches (`skip_on_policy_old_logps`: the IS ratios come from the training
forward, same numbers); **skip + shared** (both defaults): also, rows of a forward chunk that share their prompt run it
once (`share_prompt_forward`: a prefix pass per distinct prompt, then every row's completion over its keys/values,
same numbers). One EPO trainer per model with a real colocated CPU vLLM engine, on a `key` maze the models cannot
finish (every episode lasts the maximum turns); its steps go round-robin through step / trajectory mode x the three
paths, so machine drift hits all six alike. **tokens** = positions each pass runs (padding included; a shared
prompt once); **unique tokens** = the rows' non-padding tokens, or the distinct prefixes of all rows (the floor of a
forward that shares every common opening: a GRPO group's copies of a prompt, and an episode's turns in step mode);
**redundancy** = all passes' tokens ÷ one forward + backward over the unique tokens (beta = 0: no reference pass).
**trainer s/step** = old-logp + reference + forward + backward + optimizer, timed as CPU seconds of the training
thread (one torch thread; on CPU autograd runs the backward in that thread), robust to other load on a shared machine
(wall seconds in the .json), and **trainer s / turn** that ÷ the step's turns (every episode lasts the maximum);
steps of different variants hold different rows, so **vs TRL's path** compares trainer time per 1k unique row
tokens. **rollout s** (generation + env) is outside the trainer's time. The last lines compare the modes on the
default path; docs/rollouts.md ("What each mode costs the trainer") turns them into which mode to pick.""",
    "remote_envs": """The maze (3x3 `trail`) with the same episodes and the same seeded random admissible actions through a
local `ProcessEnvPool` (2 workers) and `RemoteEnvPool` (`env_server_urls`) over 1 and 2 `epo-trl serve-env` servers
started on this machine (uvicorn, 127.0.0.1: no network in the path, so this is the protocol's own cost: JSON over a
WebSocket, the server's event loop and its per-session env thread). One batched `pool.act` per turn is timed;
resets are not. **ms per step** = median turn time ÷ episodes per turn (batch 1: the latency of one remote step);
**vs local** = steps/s ÷ the local pool's at the same batch. The servers share the machine's cores with the client,
so a second server adds no CPU here; on other machines it adds theirs. A maze step costs microseconds: for the
JVM envs (milliseconds per step) the same overhead is a far smaller share.""",
    "sync_separation": """Does the check `SyncCheck` runs after every push tell a stale engine from numerical noise? It scores
a fixed text (`PROBE_TEXT`, teacher-forced: vLLM's `prompt_logprobs`) with the engine and with the trainer in the
engine's precision (bf16 autocast for a bf16 engine); the statistic is their mean |Δ log p| over the same gap right
after the run's first push (a full reload of the weights the engine holds). The trainer (fp32 master weights) moves
`steps behind` AdamW steps at its recipe's learning rate on a maze prompt; the engine (colocate: `vllm.LLM` in this
process; server: `epo-trl vllm-serve`, gloo transfer) then holds the new weights (**correct push**) or a stale state:
the old weights (**no-op push**), the new weights with the tied LM head's packed copy left stale (**tied head not
re-packed**, CPU vLLM's own defect; colocate only: a server runs the same reload) or with the middle decoder layer
left at the old weights (**one layer skipped**). **probe separation** = the smallest stale ratio ÷ the correct one
(3x or more separates them); the previous check's (8 tokens sampled at temperature 1, absolute gap, six samples per
state) is next to it. The check's second part, the **fingerprints** (`weight_fingerprint`: per layer group, float64
sums of the weight columns the engine's own kernels return for unit inputs, against the trainer's weights cast to
the engine's dtype), reads the worst group's relative mismatch; it refuses above 1e-10.""",
}

GPU_TITLE = "GPU (device)"
# The GPU section's file: `python -m research.bench.gpu_check` (make gpu-check) writes it beside the report.
GPU_CHECK_FILE = "gpu_check.json"
GPU_NOT_RUN = """**Not run yet**: no CUDA GPU has been lent to a session of this project. Whoever is lent one runs, first:

    make gpu-check

(on a machine without network whose Python already holds the package's dependencies and CUDA torch:
`make gpu-check GPU_PYTHON=python3`; on a copy of the tree without `.git`, add `GPU_CHECK_ARGS="--commit <hash>"`). On one GPU, in at most 10 minutes, `research/bench/gpu_check.py` runs four
parts, each in a process of its own with pass / fail checks, timings and its error recorded:

- **epo_aepo**: bf16 EPO and AEPO optimizer steps, step and trajectory mode, on the built-in maze with a random-init
  model of Qwen2.5-1.5B's shape (hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960, vocab 151936, tied
  embeddings; weights cannot travel) and the package's offline tokenizer;
- **vllm_colocate**: the same EPO steps with rollouts on a colocated vLLM engine (the GPU build), the weight-sync
  probe after every push;
- **zero2**: EPO steps under DeepSpeed ZeRO-2 on one GPU (`recipes/accelerate/zero2.yaml`);
- **loss_overhead**: section 1's benchmark on CUDA in bf16 (Qwen2.5-0.5B's shape).

It writes `docs/gpu_check.json`, which every `python -m research.bench` run folds in here with that check's date,
machine and commit (`make gpu-check` runs `--report-only` after it: nothing else is re-measured). Without CUDA it
refuses (exit 2). `python -m research.bench.gpu_check --dry-run` runs the same code on CPU with a tiny fp32 model
of the same layout (the parts that need CUDA are skipped unless `--parts` names them: then vLLM's CPU build and
DeepSpeed's CPU accelerator run them): all four parts passed that way on the project's 2-core VM, shared with other
jobs, in 341 s (2026-12-07). tests/test_gpu_check.py runs one of its training runs and the script's own logic."""


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m research.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions / smaller sizes (a few minutes)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--output", default="docs/benchmarks.md", help="markdown report (raw numbers: .json beside)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="loss_overhead only: 'cuda' = the bf16 ~0.5B model on a GPU")  # fmt: skip
    parser.add_argument("--update", action="store_true",
                        help="re-run only --sections and keep the other sections' results from <output>.json")  # fmt: skip
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: re-render <output> from <output>.json")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: tiny sizes, 1 rep
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # Copy argv first: an env package imported later rewrites sys.argv (seen: "domain task").
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = _parse(argv)
    if opts.device == "cuda" and opts.sections != ["loss_overhead"]:
        raise SystemExit("--device cuda applies to the loss_overhead section only: add --sections loss_overhead.")
    out = Path(opts.output)
    previous = out.with_suffix(".json")
    if opts.report_only:
        if not previous.exists():
            raise SystemExit(f"--report-only re-renders {out} from {previous}, which does not exist.")
        report = render_raw(json.loads(previous.read_text()), load_gpu_check(out))
        out.write_text(report)
        print(report)
        return 0
    setup_offline()
    started = time.perf_counter()
    info = machine_info()
    command = " ".join(["python -m research.bench", *argv])
    # the code as this run starts; the bench's own files do not count as changes (chained --update runs rewrite them)
    run = run_record(info, command, git_commit(ignore=(out, previous)))
    results, timings, measured = {}, {}, {}
    for name in opts.sections:
        module = importlib.import_module(f"research.bench.{name}")
        kwargs = {"quick": opts.quick, "smoke": opts.smoke}
        if name == "loss_overhead":
            kwargs["device"] = opts.device
        t0 = time.perf_counter()
        measured[name] = {"date": utc_now(), **run}
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results[name] = module.run(**kwargs)
        timings[name] = time.perf_counter() - t0
        print(f"[bench] {name} done in {timings[name]:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    raw = {"machine": info, "command": command, "total_s": total, "section_s": timings, "results": results,
           "sections_measured": measured}  # fmt: skip
    if opts.update and previous.exists():  # the other sections as the earlier run measured them
        raw = merge(json.loads(previous.read_text()), raw)
    report = render_raw(raw, load_gpu_check(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    previous.write_text(json.dumps(raw, indent=1, default=str))
    print(report)
    return 0


def merge(before: dict, now: dict) -> dict:
    """`--update`: the sections run now replace theirs in the earlier .json; the others keep their numbers and their
    `sections_measured` records as they are (hand-written ones too, whatever their fields), and keys this code does
    not write survive, so nothing added to the file by hand is lost by a re-run."""
    measured = {**before.get("sections_measured", {}), **now["sections_measured"]}
    hand_made = any(not isinstance((measured[k] or {}).get("machine"), dict) for k in SECTIONS if k in measured)
    # the other keys ("note") describe hand-made records: they go with the last of them
    notes = {k: v for k, v in measured.items() if k not in SECTIONS and hand_made}
    return {
        **before,
        **now,
        "command": f"{before['command']}; then {now['command']}",
        "total_s": before["total_s"] + now["total_s"],
        "section_s": {**before["section_s"], **now["section_s"]},
        "results": {**before["results"], **now["results"]},
        "sections_measured": {**notes, **{k: measured[k] for k in SECTIONS if k in measured}},
    }


def load_gpu_check(report: Path) -> dict | None:
    """The GPU check's record beside `report` (GPU_CHECK_FILE), None when it was never run here."""
    path = Path(report).with_name(GPU_CHECK_FILE)
    return json.loads(path.read_text()) if path.exists() else None


def render_raw(raw: dict, gpu: dict | None = None) -> str:
    """The report from a .json this module wrote (or an older one, without `sections_measured`), and the GPU check's
    record, if any."""
    return render(raw["results"], raw["section_s"], raw["machine"], raw["command"], raw["total_s"],
                  raw.get("sections_measured", {}), gpu)  # fmt: skip


def render(results: dict, timings: dict, info: dict, command: str, total: float, measured: dict | None = None,
           gpu: dict | None = None) -> str:  # fmt: skip
    parts = [
        "# Benchmarks",
        "",
        "Generated by `make bench` / `python -m research.bench`; do not edit by hand (raw numbers in the `.json` "
        "file beside this one). Ratios are measured side by side in one run, on one machine. Sections re-run with "
        "`--update` come from different runs: the **Measured** line under each heading says when, on what and at "
        "which commit its numbers were measured.",
        "",
        f"- command: `{command}` (total {total:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + ")",
        f"- latest run: {info['date']}, {_machine(info)}"
        + ("" if info.get("bf16_native") is None else f" (bf16 {'native' if info['bf16_native'] else 'emulated'})"),
        f"- software (latest run): {_software(info)}",
    ]
    # what a hand-written `sections_measured` says about its records as a whole (see merge)
    parts += [f"- {key} on the hand-added records: {value}" for key, value in (measured or {}).items()
              if key not in SECTIONS and isinstance(value, str)]  # fmt: skip
    parts += [""]
    for name, title in SECTIONS.items():
        if name not in results:
            continue
        module = importlib.import_module(f"research.bench.{name}")
        parts += [f"## {title}", "", measured_line((measured or {}).get(name)), ""]
        parts += [HOW_TO_READ[name], "", module.to_markdown(results[name]), ""]
        verdict = _verdict(name, results[name])
        if verdict:
            parts += [verdict, ""]
    parts += [gpu_section(gpu), ""]
    return "\n".join(parts)


def gpu_section(record: dict | None) -> str:
    """The "GPU (device)" section: how to run the GPU check, or what its record (gpu_check.json) says."""
    if record is None:
        return f"## {GPU_TITLE}\n\n{GPU_NOT_RUN}"
    from . import gpu_check, loss_overhead

    parts = [f"## {GPU_TITLE}", "", measured_line(record.get("measured"))]
    if record.get("dry_run"):
        parts += ["", "**A dry run on CPU with a tiny fp32 model (`--dry-run`): it shows the check works, its numbers "
                  "are not GPU numbers.**"]  # fmt: skip
    parts += ["", gpu_check.to_markdown(record)]
    overhead = record.get("parts", {}).get("loss_overhead", {})
    if overhead.get("results"):
        parts += ["", "Loss overhead on this device (section 1's benchmark, read as there):", "",
                  loss_overhead.to_markdown(overhead["results"]), "", _verdict("loss_overhead", overhead["results"])]  # fmt: skip
    return "\n".join(parts)


def _machine(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}), {m['ram_gib']} GiB RAM, "
            + (f"GPU: {m['cuda']}" if m.get("cuda") else "no GPU"))  # fmt: skip


def _software(m: dict) -> str:
    return f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}" + (
        f", vllm {m['vllm']}" if m.get("vllm") else ""
    )


def measured_line(record: dict | None) -> str:
    """`**Measured**: <date> on <machine> (bf16 native|emulated), commit <hash>` from a `sections_measured` record.

    A hand-written record (the .json before the bench kept these) has text or null for date, machine and commit,
    `<field>_note` saying what is known instead, and `bf16` as text: shown as it is."""
    if record is None:
        return "**Measured**: not recorded (this section's numbers predate per-section records)."
    machine = record.get("machine")
    if isinstance(machine, dict):
        native = {True: "native", False: "emulated"}.get(machine.get("bf16_native"), "unknown")
        # with a GPU, what is emulated or not is the CPU's bf16 (the GPU's is native)
        bf16 = f"{'CPU ' if machine.get('cuda') else ''}bf16 {native}"
        return (f"**Measured**: {record['date']} on {_machine(machine)} ({bf16}), commit {record['commit']}; "
                f"{_software(record['software'])}; by `{record['run']}`.")  # fmt: skip
    fields = []
    for key in ("date", "machine", "bf16", "commit", "run"):
        value, note = record.get(key), record.get(f"{key}_note")
        value = f"`{value}`" if value and key == "run" else value
        if value or note:  # a note without a value says itself what is not recorded
            fields.append(f"{key}: " + (f"{value} ({note})" if value and note else value or note))
    return f"**Measured** (added by hand, not by the bench): {'; '.join(fields)}."


def _verdict(name: str, r: dict) -> str:
    """One line per target, stated from the numbers."""
    if name == "loss_overhead":
        lines = []
        for model, row in r.items():
            t, m = row["time_ratio_vs_bonus"], row["memory_ratio_vs_bonus"]
            lines.append(
                f"- {model}: EPO vs GRPO + bonus: time {100 * (t - 1):+.1f}% ({'met' if t <= 1.03 else 'NOT met'}, "
                f"target <= +3%), memory {100 * (m - 1):+.1f}% ({'met' if m <= 1.02 else 'NOT met'}, target <= +2%); "
                f"vs plain GRPO: time {100 * (row['time_ratio'] - 1):+.1f}%, memory {100 * (row['memory_ratio'] - 1):+.1f}%"
            )
        return "\n".join(lines)
    if name == "vllm_cpu":
        return "\n".join(
            f"- {row['model']}: engine ÷ vLLM step {row['step_engine_ratio']:.3f}, trajectory "
            f"{row['trajectory_engine_ratio']:.3f} ("
            + ("met" if min(row["step_engine_ratio"], row["trajectory_engine_ratio"]) >= 0.95 else "NOT met")
            + ", target >= 0.95)"
            for row in r["rows"]
            if "skipped" not in row
        )
    if name == "sync_separation":
        from .sync_separation import verdict

        return verdict(r)
    if name == "rollout_efficiency":
        return "\n".join(
            f"- {mode}: ratio {row['ratio']:.3f} ({'met' if row['ratio'] >= 0.95 else 'NOT met'}, target >= 0.95)"
            + ("" if row.get("replay_matched_tokens", True) else "; the replay sampled different token counts")
            for mode, row in r.items()
        )
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
