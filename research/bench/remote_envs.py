"""Benchmark 8: envs on OpenEnv servers (`RemoteEnvPool`, `epo-trl serve-env`) vs a local process pool.

The same env (the maze, 3x3 `trail`), the same episodes and the same actions (a seeded random admissible action per
episode and turn) through three pools: `ProcessEnvPool` with 2 workers, and `RemoteEnvPool` over 1 and over 2 servers
on this machine (uvicorn subprocesses on 127.0.0.1, sessions balanced across them). Timed: one batched `pool.act`
per turn over every episode (`project_action` + `step` + admissible actions, plus, remotely, the JSON round trip);
a finished game restarts with an untimed reset. Batch 1 gives the latency of one step; batch 8 the throughput of a
turn of 8 episodes.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from .common import md_table
from .env_throughput import lockstep_turns

MAZE = {"size": 3, "task": "trail"}
BATCHES = (1, 8)
STEPS = {"full": 2000, "quick": 400, "smoke": 16}  # env steps per setting (all episodes together)
WARMUP_TURNS = 5


def _serve(port: int) -> subprocess.Popen:
    import json

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "epo_trl", "serve-env", "maze", "--env_kwargs", json.dumps(MAZE)]
    cmd += ["--port", str(port), "--max_sessions", "16"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(url: str, proc: subprocess.Popen, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).read()  # noqa: S310 - our own local server
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"serve-env at {url} did not start")


def _measure(pool, tasks, batch: int, total_steps: int) -> dict:
    """Step `batch` episodes in lockstep turns, a random admissible action each; per-turn seconds of the batched act."""
    times = lockstep_turns(pool, tasks, batch, total_steps, _random_action, WARMUP_TURNS)
    steps = len(times) * batch
    return {"steps": steps, "steps_per_s": steps / sum(times), "turn_ms_median": 1000 * statistics.median(times)}


def _random_action(rng, admissible, _turn) -> str:
    return rng.choice(admissible or ["look"])


def run(quick: bool = False, smoke: bool = False) -> dict:
    from epo_trl.envs.maze import MazeFactory
    from epo_trl.envs.pool import ProcessEnvPool
    from epo_trl.envs.pool.remote import RemoteEnvPool

    total = STEPS["smoke" if smoke else "quick" if quick else "full"]
    factory = MazeFactory(**MAZE)
    tasks = factory.tasks("train")[:16]
    ports = [_free_port(), _free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    servers = [_serve(p) for p in ports]
    out = {}
    try:
        for url, proc in zip(urls, servers):
            _up(url, proc)
        pools = {
            "local processes (2 workers)": lambda: ProcessEnvPool(factory, 2, timeout=60),
            "remote, 1 server": lambda: RemoteEnvPool(factory, 8, 60, urls=urls[:1]),
            "remote, 2 servers": lambda: RemoteEnvPool(factory, 8, 60, urls=urls),
        }
        for name, make in pools.items():
            for batch in BATCHES:
                pool = make()
                try:
                    out[f"{name}/{batch}"] = {"pool": name, "batch": batch, **_measure(pool, tasks, batch, total)}
                finally:
                    pool.close()
    finally:
        for proc in servers:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return out


def to_markdown(results: dict) -> str:
    base = {r["batch"]: r["steps_per_s"] for r in results.values() if r["pool"].startswith("local")}
    rows = [
        [
            r["pool"],
            r["batch"],
            r["steps"],
            r["steps_per_s"],
            r["turn_ms_median"],
            r["turn_ms_median"] / r["batch"],
            r["steps_per_s"] / base[r["batch"]],
        ]
        for r in results.values()
    ]
    header = ["pool", "episodes per turn", "steps", "steps/s", "median turn ms", "ms per step", "vs local"]
    return md_table(header, rows)
