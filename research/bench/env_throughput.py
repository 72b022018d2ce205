"""Benchmark 3: environment steps/s through the rollout's env pools, 1 / 2 / 4 workers, threads vs processes.

What is timed is what the rollout engine pays per turn: one batched `pool.act` over every episode's env
(`project_action` + `step` + `admissible_actions()` next to the env). A finished game restarts with a `reset`,
untimed (a rollout resets all its episodes at once, before the first turn).
`ENVS` episodes are spread over the workers. Threads = `ThreadEnvPool` (ALFWorld's envs behind one lock: TextWorld's
parser is module-global and not thread-safe); processes = `ProcessEnvPool` (each worker owns its envs). Start-up
(JVMs, game loading) and a few warm-up turns are not timed. Also measured: how long worker processes take to
start per start method (in a fresh interpreter that has already imported torch and TRL, as a trainer has).
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import threading
import time

from .common import md_table

WORKERS = (1, 2, 4)
ENVS = 4  # episodes stepped each turn, spread over the workers
STEPS = {"full": 240, "quick": 80, "smoke": 8}  # total env steps per setting
WARMUP_TURNS = {
    "scienceworld": 20,
    "alfworld": 3,
    "textworld_express": 20,
}  # untimed; the JVMs' JIT needs a few dozen steps
# Commands valid in any ScienceWorld room that neither end the episode nor need an object.
SW_ACTIONS = ("look around", "inventory", "wait1", "look around", "go to hallway", "go to kitchen")
SW_TASK = "boil"
ALFWORLD_TARGET = 1.7  # 2 process workers vs 1, ALFWorld, on 2 cores


class _Locked:
    """An env whose calls hold one process-wide lock (threads sharing TextWorld's parser)."""

    lock = threading.Lock()

    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):
        fn = getattr(self.env, name)
        if not callable(fn):
            return fn

        def locked(*args, **kwargs):
            with self.lock:
                return fn(*args, **kwargs)

        return locked


class _LockedFactory:
    def __init__(self, inner):
        self.inner, self.name, self.thread_safe = inner, inner.name, True

    def make(self):
        return _Locked(self.inner.make())


def lockstep_turns(pool, tasks, envs: int, total_steps: int, choose, warmup: int) -> list[float]:
    """Step `envs` episodes in lockstep turns through `pool` until `total_steps`; the seconds of each timed turn's
    batched act. `choose(rng, admissible, k)` picks episode i's action on turn k (warm-up turns count down from -1)."""
    handles = [pool.acquire() for _ in range(envs)]
    rngs = [random.Random(i) for i in range(envs)]
    admissible: list = [None] * envs

    def restart(ids):
        for i, (ok, value) in zip(ids, pool.reset([(handles[i], tasks[i % len(tasks)]) for i in ids])):
            if not ok:
                raise RuntimeError(f"env reset failed: {value}")
            admissible[i] = value.get("admissible")

    def turn(k: int) -> float:
        """Seconds of one batched step of every episode (a finished game then restarts, untimed)."""
        items = [(handles[i], choose(rngs[i], admissible[i], i + k)) for i in range(envs)]
        t0 = time.perf_counter()
        results = pool.act(items)
        elapsed = time.perf_counter() - t0
        finished = []
        for i, (ok, value) in enumerate(results):
            if not ok:
                raise RuntimeError(f"env step failed: {value}")
            admissible[i] = value.get("admissible")
            if value["terminated"] or value["truncated"]:
                finished.append(i)
        if finished:  # in a rollout every reset happens at once, before the first turn: not part of stepping
            restart(finished)
        return elapsed

    restart(range(envs))
    for k in range(warmup):
        turn(-k - 1)
    return [turn(k) for k in range(max(1, -(-total_steps // envs)))]


def _pool_steps_per_s(pool, tasks, total_steps: int, choose, warmup: int) -> tuple[float, int]:
    """Step `ENVS` episodes in lockstep turns through `pool` until `total_steps`; return (steps/s, steps)."""
    times = lockstep_turns(pool, tasks, ENVS, total_steps, choose, warmup)
    steps = len(times) * ENVS
    return steps / sum(times), steps


def _sweep(factory, locked_threads: bool, tasks, total_steps: int, workers, choose, warmup: int) -> dict:
    from epo_trl.envs.pool import ProcessEnvPool, ThreadEnvPool

    out = {}
    for kind in ("threads", "processes"):
        for n in workers:
            if kind == "threads":
                pool = ThreadEnvPool(_LockedFactory(factory) if locked_threads else factory, n, timeout=120)
            else:
                pool = ProcessEnvPool(factory, n, timeout=120)
            try:
                rate, steps = _pool_steps_per_s(pool, tasks, total_steps, choose, warmup)
            finally:
                pool.close()
            mode = "threads (locked)" if kind == "threads" and locked_threads else kind
            out[f"{kind}/{n}"] = {"mode": mode, "workers": n, "steps": steps, "steps_per_s": rate}
    return out


def scienceworld(total_steps: int, workers=WORKERS) -> dict:
    from epo_trl.envs.protocol import TaskSpec
    from epo_trl.envs.scienceworld import ScienceWorldFactory

    factory = ScienceWorldFactory(task_names=[SW_TASK], held_out_tasks=(), env_step_limit=100_000)
    tasks = [TaskSpec("scienceworld", SW_TASK, 0, 0)]
    choose = lambda rng, adm, k: SW_ACTIONS[k % len(SW_ACTIONS)]  # noqa: E731
    return _sweep(factory, False, tasks, total_steps, workers, choose, WARMUP_TURNS["scienceworld"])


def alfworld(total_steps: int, workers=WORKERS) -> dict:
    from epo_trl.envs.alfworld.env import ALFWorldFactory
    from epo_trl.envs.alfworld.games import write_sample_games

    with tempfile.TemporaryDirectory() as root:
        write_sample_games(root)
        factory = ALFWorldFactory(data_path=root)
        tasks = factory.tasks("train")
        # a random admissible command (the sample games are small: random play wins and restarts now and then)
        choose = lambda rng, adm, k: rng.choice(adm or ["look"])  # noqa: E731
        return _sweep(factory, True, tasks, total_steps, workers, choose, WARMUP_TURNS["alfworld"])


def textworld_express(total_steps: int, workers=WORKERS) -> dict:
    from epo_trl.envs.textworld_express import TextWorldExpressFactory

    # Coin Collector, 11 rooms with doors (the long-horizon setting); a random admissible action each step
    factory = TextWorldExpressFactory(game="coin", game_params="numLocations=11,includeDoors=1", num_train=8)
    choose = lambda rng, adm, k: rng.choice(adm or ["look around"])  # noqa: E731
    return _sweep(factory, False, factory.tasks("train"), total_steps, workers, choose,
                  WARMUP_TURNS["textworld_express"])  # fmt: skip


def textworld_express_resets(count: int = 8) -> dict:
    """Seconds per env to reset `count` Coin Collector games through 2 process workers: on fresh envs (each starts
    its JVM), then on the same envs again (what evaluation batches and warm-start rendering pay since they reuse
    their engine's envs)."""
    from epo_trl.envs.pool import ProcessEnvPool
    from epo_trl.envs.textworld_express import TextWorldExpressFactory

    factory = TextWorldExpressFactory(game="coin", game_params="numLocations=11,includeDoors=1", num_train=count)
    tasks = factory.tasks("train")
    pool = ProcessEnvPool(factory, 2)
    try:
        handles = [pool.acquire() for _ in tasks]
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            assert all(ok for ok, _ in pool.reset(list(zip(handles, tasks))))
            times.append((time.perf_counter() - t0) / count)
    finally:
        pool.close()
    return {"envs": count, "fresh_s": times[0], "reused_s": times[1]}


_STARTUP_SCRIPT = """
import sys, time
import torch, trl  # a trainer has these loaded before its rollout starts workers
from epo_trl.envs.maze import MazeFactory
from epo_trl.envs.pool import ProcessEnvPool

if __name__ == "__main__":
    factory, task = MazeFactory(), MazeFactory().tasks()[0]
    t0 = time.perf_counter()
    pool = ProcessEnvPool(factory, 2, start_method=sys.argv[1])
    assert all(ok for ok, _ in pool.reset([(pool.acquire(), task), (pool.acquire(), task)]))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool.workers[0].kill()  # as after a hang: the replacement's start-up is on the critical path
    assert pool.reset([(pool.acquire(), task)])[0][0]
    print(first, time.perf_counter() - t0)
    pool.close()
"""


def startup(methods=("fork", "forkserver", "spawn")) -> dict:
    """Seconds until 2 fresh workers answered a reset, and until a killed worker's replacement did."""
    out = {}
    for method in methods:
        proc = subprocess.run(
            [sys.executable, "-c", _STARTUP_SCRIPT, method], capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            out[method] = {"error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr else "failed"}
            continue
        first, replacement = (float(x) for x in proc.stdout.split())
        out[method] = {"first_two_workers_s": first, "replacement_worker_s": replacement}
    return out


def _guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - a missing JVM / package makes a row of the report, not a crash
        return {"error": f"{type(e).__name__}: {e}"}


def run(
    quick: bool = False, smoke: bool = False, envs: tuple[str, ...] = ("scienceworld", "alfworld", "textworld_express")
) -> dict:
    steps = STEPS["smoke" if smoke else "quick" if quick else "full"]
    workers = (1, 2) if smoke else WORKERS
    fns = {"scienceworld": scienceworld, "alfworld": alfworld, "textworld_express": textworld_express}
    out = {name: _guarded(fns[name], steps, workers) for name in envs}
    out["worker_startup"] = _guarded(startup, ("forkserver",) if smoke else ("fork", "forkserver", "spawn"))
    if "textworld_express" in envs:
        out["textworld_express_resets"] = _guarded(textworld_express_resets, 4 if smoke else 8)
    return out


def to_markdown(results: dict) -> str:
    from epo_trl.envs.pool import DEFAULT_START_METHOD

    rows, lines = [], []
    for env, settings in results.items():
        if env in ("worker_startup", "textworld_express_resets"):
            continue
        if "error" in settings:
            rows.append([env, "—", "—", "—", "—", f"not run: {settings['error']}"])
            continue
        single = {r["mode"]: r["steps_per_s"] for r in settings.values() if r["workers"] == 1}
        for r in settings.values():
            speedup = r["steps_per_s"] / single[r["mode"]]
            rows.append([env, r["mode"], r["workers"], r["steps"], f"{r['steps_per_s']:.1f}", f"{speedup:.2f}x"])
        two = settings.get("processes/2")
        if env == "alfworld" and two:
            ratio = two["steps_per_s"] / settings["processes/1"]["steps_per_s"]
            met = "met" if ratio >= ALFWORLD_TARGET else "NOT met"
            lines.append(
                f"- alfworld: 2 process workers = {ratio:.2f}x one worker ({met}, target >= {ALFWORLD_TARGET}x)"
            )
    table = md_table(["env", "workers", "n", "steps", "steps/s", "vs 1 worker"], rows)
    startup_rows = [
        [m, f"{r['first_two_workers_s']:.2f}", f"{r['replacement_worker_s']:.2f}"]
        if "error" not in r
        else [m, "—", r["error"]]
        for m, r in results.get("worker_startup", {}).items()
        if isinstance(r, dict)
    ]
    resets = results.get("textworld_express_resets")
    if resets and "error" not in resets:
        lines.append(
            f"- textworld_express resets, {resets['envs']} envs through 2 process workers: {resets['fresh_s']:.2f} s "
            f"per env fresh (each starts its JVM) vs {resets['reused_s']:.2f} s reused "
            f"({resets['fresh_s'] / resets['reused_s']:.1f}x); evaluation batches and warm-start rendering reuse "
            "their envs"
        )
    parts = [table, *([""] + lines if lines else [])]
    if startup_rows:
        parts += [
            "",
            f"Worker start-up by start method (default: `{DEFAULT_START_METHOD}`; `fork` is not used: the trainer's "
            "torch / CUDA / tokenizer threads may hold locks a forked child inherits):",
            "",
            md_table(
                ["start method", "2 workers answered a reset (s)", "replacement worker answered (s)"], startup_rows
            ),
        ]
    return "\n".join(parts)
