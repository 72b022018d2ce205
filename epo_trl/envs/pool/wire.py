"""The worker end of the process pool and the messages both ends exchange (see epo_trl/envs/pool/__init__.py for the
wire protocol): the three operations run next to an env, and the worker's loop."""

from __future__ import annotations

import builtins
import os
import signal
import threading
import time
from collections.abc import Sequence

from ..protocol import (
    EnvFactory,
    EnvProtocolError,
    TaskSpec,
    TextEnv,
    check_admissible,
    check_projection,
    check_reset,
    check_step,
)


def op_reset(env: TextEnv, name: str, task: TaskSpec) -> dict:
    obs, goal = check_reset(name, env.reset(task))
    return {"obs": obs, "goal": goal, "admissible": check_admissible(name, env.admissible_actions())}


def op_act(env: TextEnv, name: str, text: str) -> dict:
    """The model's action text -> `project_action` -> (if accepted) `step` -> admissible actions."""
    action = check_projection(name, env.project_action(text))
    if action is None:
        return {"action": None}
    step = check_step(name, env.step(action))
    ended = step.terminated or step.truncated
    admissible = None if ended else check_admissible(name, env.admissible_actions())
    return {"action": action, **step._asdict(), "admissible": admissible}


def op_replay(env: TextEnv, name: str, task: TaskSpec, commands: Sequence[str]) -> dict:
    """Rebuild an episode's state on a fresh env: reset + the commands it had taken."""
    out = op_reset(env, name, task)
    for command in commands:
        out = {"obs": check_step(name, env.step(command)).obs, "goal": out["goal"], "admissible": None}
    out["admissible"] = check_admissible(name, env.admissible_actions())
    return out


def _quiet_close(env: TextEnv | None) -> None:
    if env is None:
        return
    try:
        env.close()
    except Exception:  # noqa: BLE001 - a broken env's close must not break training
        pass


class EnvWorkerError(RuntimeError):
    """An env call failed in a worker process with an exception that is not a Python builtin."""


class WorkerDiedError(RuntimeError):
    """The worker process running an env call died (crash, killed, out of memory)."""


def _rebuild_error(name: str, message: str) -> BaseException:
    """The worker's exception as the same builtin type when possible, so failures read the same in both modes."""
    cls = {"EnvProtocolError": EnvProtocolError}.get(name) or getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - odd constructor signature
            pass
    return EnvWorkerError(f"{name}: {message}")


def _watch_parent(parent: int) -> None:
    """Exit (with everything this worker started) once the process that started it is gone."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            _kill_own_group()


def _kill_own_group() -> None:
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(1)


def worker_main(conn, factory: EnvFactory) -> None:
    """A worker process: owns the envs of its slots, runs each batch of ops in order, answers every op.

    `conn` is the parent's multiprocessing Pipe: `recv` unpickles, which runs whatever code the sender chose. Fine
    inside one process tree; never hand this loop a connection from a socket (a remote worker must speak JSON)."""
    if hasattr(os, "setsid"):
        os.setsid()  # its own process group: killing the worker also kills the JVMs it started
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes the pool
    name = getattr(factory, "name", type(factory).__name__)
    envs: dict[int, TextEnv] = {}

    def env_of(slot: int) -> TextEnv:
        if slot not in envs:
            envs[slot] = factory.make()
        return envs[slot]

    conn.send({"ready": True})
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg.get("shutdown"):
                break
            for op in msg["ops"]:
                kind, slot = op["op"], op["slot"]
                try:
                    if kind == "close":
                        _quiet_close(envs.pop(slot, None))
                        value = {}
                    elif kind == "reset":
                        value = op_reset(env_of(slot), name, TaskSpec(**op["task"]))
                    elif kind == "act":
                        value = op_act(env_of(slot), name, op["text"])
                    elif kind == "replay":
                        _quiet_close(envs.pop(slot, None))
                        value = op_replay(env_of(slot), name, TaskSpec(**op["task"]), op["commands"])
                    else:
                        raise ValueError(f"unknown env worker op {kind!r}")
                    reply = {"ok": True, "value": value}
                except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the episode
                    reply = {"ok": False, "error": type(e).__name__, "message": str(e)}
                conn.send(reply)
    finally:
        for env in envs.values():
            _quiet_close(env)
