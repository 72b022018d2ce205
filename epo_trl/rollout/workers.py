"""Environment workers: who owns the live envs and runs their calls with a timeout, in threads or in processes.

Two pools behind one interface (`EnvPool`), picked by `RolloutConfig.env_workers`:

- `ThreadEnvPool`: envs live in the trainer process, called from daemon threads. Cheapest; only for envs whose
  separate instances can run concurrently in one interpreter (`EnvFactory.thread_safe = True`, e.g. the maze).
- `ProcessEnvPool`: `num_workers` worker processes, each owning the envs placed on it. Every turn the pool sends
  ONE message per worker holding all of that worker's operations; the worker runs them in order and answers each.
  For envs with process-global state (TextWorld's parser in ALFWorld) or a JVM (ScienceWorld), and for true
  parallelism (no GIL).

Both run every env call next to its env, as one of three operations (`reset`, `act`, `replay`), and check what
the env returns (`check_*`: a wrong type fails the episode with a message naming the env and the field). A call
that raises, returns garbage or runs past `timeout` fails its episode only. A hung thread cannot be killed: it is
abandoned and replaced (daemon threads, so it never blocks interpreter exit). A hung or dead worker process is
killed with its process group (JVMs included) and replaced; the other episodes it held are rebuilt on the new
worker by replaying their task and commands (envs are deterministic per TaskSpec), or failed if the replay does
not reproduce their last observation.

Wire protocol (plain dicts of str / numbers / bools / lists, so a worker could sit behind a socket):

    parent -> worker  {"ops": [op, ...]}                one message per worker per turn
                      {"shutdown": True}
        op = {"op": "reset",  "slot": int, "task": TaskSpec.to_dict()}
             {"op": "act",    "slot": int, "text": str}                 project_action + step + admissible
             {"op": "replay", "slot": int, "task": {...}, "commands": [str, ...]}
             {"op": "close",  "slot": int}
    worker -> parent  {"ready": True} once, then one reply per op, in order:
                      {"ok": True, "value": {...}}  |  {"ok": False, "error": "TypeName", "message": str}
        reset/replay value = {"obs": str, "goal": str, "admissible": [str] | None}
        act value = {"action": None} (rejected by project_action, no step) |
                    {"action": str, "obs": str, "done": bool, "won": bool, "admissible": [str] | None}
"""

from __future__ import annotations

import atexit
import builtins
import math
import multiprocessing as mp
import numbers
import os
import queue
import signal
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from multiprocessing.connection import wait as wait_connections
from typing import Any

from ..envs.base import EnvFactory, TaskSpec, TextEnv

WORKER_KINDS = ("auto", "threads", "processes")
#: Start method of worker processes. Not "fork": the trainer holds torch/CUDA/tokenizer threads, and a forked child
#: can inherit a lock one of them held. "forkserver" forks from a clean server that imported this module once, so
#: a worker starts in milliseconds instead of re-importing torch and TRL (~8 s with "spawn"; docs/benchmarks.md).
DEFAULT_START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
READY_TIMEOUT_S = 300.0  # a worker's imports (torch, TRL, the env package) on a loaded machine

Result = tuple[bool, Any]  # (ok, value dict | exception)


# ----- what envs return -----------------------------------------------------------------------------------------
class EnvProtocolError(TypeError):
    """An environment returned a value of the wrong type (named env, named field)."""


def _bad(env: str, field: str, value: Any, expected: str) -> EnvProtocolError:
    return EnvProtocolError(
        f"env {env!r} returned {field} = {value!r:.80} ({type(value).__name__}); expected {expected}"
    )


def _as_bool(env: str, field: str, value: Any) -> bool:
    # numpy bools are fine; strings ("false" is truthy) and numbers are not
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    raise _bad(env, field, value, "a bool")


def check_admissible(env: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise _bad(env, "admissible_actions()", value, "a list of str or None")
    return list(value)


def check_reset(env: str, out: Any) -> tuple[str, str]:
    """(observation, goal) of `env.reset(task)`."""
    if not isinstance(out, tuple) or len(out) != 2:
        raise _bad(env, "reset()", out, "a tuple (observation, info)")
    obs, info = out
    if not isinstance(obs, str):
        raise _bad(env, "reset() observation", obs, "a str")
    if not isinstance(info, dict):
        raise _bad(env, "reset() info", info, "a dict")
    goal = info.get("goal", "")
    if not isinstance(goal, str):
        raise _bad(env, "reset() info['goal']", goal, "a str")
    return obs, goal


def check_step(env: str, out: Any) -> tuple[str, bool, bool]:
    """(observation, done, won) of `env.step(action)`; the reward must be a finite number."""
    if not isinstance(out, tuple) or len(out) != 4:
        raise _bad(env, "step()", out, "a tuple (observation, reward, done, info)")
    obs, reward, done, info = out
    if not isinstance(obs, str):
        raise _bad(env, "step() observation", obs, "a str")
    if isinstance(reward, (bool, str)) or not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise _bad(env, "step() reward", reward, "a finite number")
    done = _as_bool(env, "step() done", done)
    if not isinstance(info, dict):
        raise _bad(env, "step() info", info, "a dict")
    won = _as_bool(env, "step() info['won']", info.get("won", False))
    return obs, done, won


def check_projection(env: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _bad(env, "project_action()", value, "a str or None")
    return value or None


# ----- operations, run next to the env ---------------------------------------------------------------------------
def op_reset(env: TextEnv, name: str, task: TaskSpec) -> dict:
    obs, goal = check_reset(name, env.reset(task))
    return {"obs": obs, "goal": goal, "admissible": check_admissible(name, env.admissible_actions())}


def op_act(env: TextEnv, name: str, text: str) -> dict:
    """The model's action text -> `project_action` -> (if accepted) `step` -> admissible actions."""
    action = check_projection(name, env.project_action(text))
    if action is None:
        return {"action": None}
    obs, done, won = check_step(name, env.step(action))
    admissible = None if done else check_admissible(name, env.admissible_actions())
    return {"action": action, "obs": obs, "done": done, "won": won, "admissible": admissible}


def op_replay(env: TextEnv, name: str, task: TaskSpec, commands: Sequence[str]) -> dict:
    """Rebuild an episode's state on a fresh env: reset + the commands it had taken."""
    out = op_reset(env, name, task)
    for command in commands:
        obs, _done, _won = check_step(name, env.step(command))
        out = {"obs": obs, "goal": out["goal"], "admissible": None}
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


# ----- the pool interface ----------------------------------------------------------------------------------------
class EnvHandle:
    """The engine's reference to one live env (the env object itself lives in a thread pool or a worker)."""

    __slots__ = ("env", "worker", "slot", "task", "commands", "obs", "lost", "__weakref__")

    def __init__(self, worker: int = -1, slot: int = -1):
        self.env: TextEnv | None = None  # threads: the env object; processes: None
        self.worker, self.slot = worker, slot
        self.task: TaskSpec | None = None  # processes: the episode so far, to rebuild it on a new worker
        self.commands: list[str] = []
        self.obs: str | None = None
        self.lost: str | None = None  # processes: why the env is gone (its worker died)


class EnvPool(ABC):
    """Live envs reused across rollouts, and the workers that call them. All calls are batched per turn.

    `reset` / `act` take (handle, argument) pairs and return one (ok, value-or-exception) per pair, in order; a
    timeout is a `TimeoutError`. A failed handle must be `discard`ed; a finished one `release`d for reuse.
    """

    kind = "?"

    def __init__(self, factory: EnvFactory, num_workers: int = 8, timeout: float = 60.0):
        self.factory, self.num_workers, self.timeout = factory, num_workers, timeout
        self.name = getattr(factory, "name", type(factory).__name__)
        self.idle: list[EnvHandle] = []

    @staticmethod
    def create(factory: EnvFactory, num_workers: int = 8, timeout: float = 60.0, kind: str = "auto", **kwargs):
        """`kind`: "threads", "processes" or "auto" (the factory's `thread_safe`: True -> threads)."""
        kind = resolve_kind(factory, kind)
        cls = ThreadEnvPool if kind == "threads" else ProcessEnvPool
        return cls(factory, num_workers, timeout, **kwargs)

    @abstractmethod
    def acquire(self) -> EnvHandle: ...

    def release(self, handle: EnvHandle) -> None:
        handle.task, handle.commands, handle.obs = None, [], None
        self.idle.append(handle)

    @abstractmethod
    def discard(self, handle: EnvHandle | None) -> None: ...

    @abstractmethod
    def reset(self, items: Sequence[tuple[EnvHandle, TaskSpec]]) -> list[Result]: ...

    @abstractmethod
    def act(self, items: Sequence[tuple[EnvHandle, str]]) -> list[Result]: ...

    @abstractmethod
    def close(self) -> None: ...


def resolve_kind(factory: EnvFactory, kind: str) -> str:
    if kind not in WORKER_KINDS:
        raise ValueError(f"env_workers={kind!r}: use one of {WORKER_KINDS}.")
    if kind == "auto":
        return "threads" if getattr(factory, "thread_safe", True) else "processes"
    return kind


# ----- threads ---------------------------------------------------------------------------------------------------
class _DaemonThreads:
    """A minimal executor on daemon threads: a hung call is abandoned (its thread replaced) and never blocks exit.

    concurrent.futures' threads are joined at interpreter exit, so one env call that never returns would keep a
    finished training process alive forever.
    """

    def __init__(self, size: int, name: str):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.name, self.count, self.surplus = name, 0, 0
        self.lock = threading.Lock()
        for _ in range(size):
            self._spawn()

    def _spawn(self) -> None:
        self.count += 1
        threading.Thread(target=self._loop, name=f"{self.name}-{self.count}", daemon=True).start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            future, fn = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)
            with self.lock:  # a thread that outlived its timeout was replaced: the pool shrinks back
                if self.surplus:
                    self.surplus -= 1
                    return

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self.queue.put((future, fn))
        return future

    def replace_hung(self, n: int) -> None:
        with self.lock:
            self.surplus += n
        for _ in range(n):
            self._spawn()

    def shutdown(self) -> None:
        for _ in range(self.count):
            self.queue.put(None)


class ThreadEnvPool(EnvPool):
    """Envs in this process, called from `num_workers` daemon threads, one call per env at a time."""

    kind = "threads"

    def __init__(self, factory: EnvFactory, num_workers: int = 8, timeout: float = 60.0):
        super().__init__(factory, num_workers, timeout)
        self.threads = _DaemonThreads(num_workers, "epo-env")

    def acquire(self) -> EnvHandle:
        return self.idle.pop() if self.idle else EnvHandle()  # the env is made on a worker thread, at reset

    def discard(self, handle: EnvHandle | None) -> None:
        if handle is not None and handle.env is not None:
            # never block on a broken env: close it on a thread of its own and forget it
            threading.Thread(target=_quiet_close, args=(handle.env,), daemon=True).start()
            handle.env = None

    def _env(self, handle: EnvHandle) -> TextEnv:
        if handle.env is None:
            handle.env = self.factory.make()
        return handle.env

    def reset(self, items):
        return self._run([lambda h=h, t=t: op_reset(self._env(h), self.name, t) for h, t in items])

    def act(self, items):
        return self._run([lambda h=h, x=x: op_act(h.env, self.name, x) for h, x in items])

    def _run(self, calls: Sequence[Callable[[], Any]]) -> list[Result]:
        results: list[Result | None] = [None] * len(calls)
        started: dict[int, float] = {}

        def timed(i: int):
            started[i] = time.monotonic()
            return calls[i]()

        pending = {self.threads.submit(lambda i=i: timed(i)): i for i in range(len(calls))}
        while pending:
            done, _ = wait(list(pending), timeout=min(self.timeout / 4, 1.0), return_when=FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                error = future.exception()
                results[i] = (False, error) if error is not None else (True, future.result())
            now = time.monotonic()
            hung = [f for f, i in pending.items() if i in started and now - started[i] > self.timeout]
            for future in hung:
                results[pending.pop(future)] = (False, TimeoutError(f"env call exceeded {self.timeout:.1f}s"))
            if hung:  # their threads stay stuck: add fresh ones so the queued calls keep moving
                self.threads.replace_hung(len(hung))
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for handle in self.idle:
            _quiet_close(handle.env)
        self.idle.clear()
        self.threads.shutdown()


# ----- processes -------------------------------------------------------------------------------------------------
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
    """A worker process: owns the envs of its slots, runs each batch of ops in order, answers every op."""
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


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx, factory: EnvFactory, index: int):
        self.index = index
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, factory), name=f"epo-env-{index}", daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.pending_closes: list[int] = []

    def kill(self) -> None:
        pid = self.process.pid
        if pid is not None and self.process.exitcode is None:
            try:
                if hasattr(os, "killpg"):
                    os.killpg(pid, signal.SIGKILL)  # the worker leads its group (setsid): JVMs die with it
                else:  # pragma: no cover - Windows
                    self.process.kill()
            except (ProcessLookupError, PermissionError):
                self.process.kill()
        self.process.join(5)
        self.conn.close()


_LIVE_POOLS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _kill_workers_at_exit() -> None:
    # Runs before multiprocessing's own exit handler (atexit is LIFO), which would join hung workers.
    for pool in list(_LIVE_POOLS):
        pool.close(grace_s=0.0)


class ProcessEnvPool(EnvPool):
    """`num_workers` worker processes, each owning the envs placed on it; one message per worker per turn."""

    kind = "processes"

    def __init__(
        self, factory: EnvFactory, num_workers: int = 8, timeout: float = 60.0, start_method: str | None = None
    ):
        super().__init__(factory, num_workers, timeout)
        self.start_method = start_method or DEFAULT_START_METHOD
        self.ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            # The server imports these once; every worker forks from it with them loaded.
            preload = [__name__, type(factory).__module__, *getattr(factory, "worker_imports", ())]
            self.ctx.set_forkserver_preload(preload)
        self.live: list[set[EnvHandle]] = [set() for _ in range(num_workers)]
        self.next_slot = 0
        self.workers = [_Worker(self.ctx, factory, i) for i in range(num_workers)]
        self.closed = False
        _LIVE_POOLS.add(self)

    # -- handles --
    def acquire(self) -> EnvHandle:
        if self.idle:
            return self.idle.pop()
        w = min(range(self.num_workers), key=lambda i: len(self.live[i]))  # the least loaded worker
        self.next_slot += 1
        handle = EnvHandle(w, self.next_slot)
        self.live[w].add(handle)
        return handle

    def release(self, handle: EnvHandle) -> None:
        if handle.lost is not None:  # its env died with a worker: nothing to reuse
            self.discard(handle)
            return
        super().release(handle)

    def discard(self, handle: EnvHandle | None) -> None:
        if handle is None or handle not in self.live[handle.worker]:
            return
        self.live[handle.worker].discard(handle)
        if handle.lost is None:  # its env still exists: close it with the worker's next batch
            self.workers[handle.worker].pending_closes.append(handle.slot)

    # -- calls --
    def reset(self, items):
        return self._run([(h, {"op": "reset", "slot": h.slot, "task": t.to_dict()}) for h, t in items])

    def act(self, items):
        return self._run([(h, {"op": "act", "slot": h.slot, "text": x}) for h, x in items])

    def _run(self, ops: Sequence[tuple[EnvHandle, dict]]) -> list[Result]:
        """Send each worker its ops in one message; collect one reply per op; recover from hung/dead workers."""
        results: list[Result | None] = [None] * len(ops)
        queues: dict[int, list] = {}
        for i, (h, op) in enumerate(ops):
            if h.lost is not None:
                results[i] = (False, WorkerDiedError(h.lost))
            else:
                queues.setdefault(h.worker, []).append((i, h, op))
        for w, worker in enumerate(self.workers):
            if worker.ready and worker.process.exitcode is not None:  # died between turns
                queues[w] = self._replace(w, culprit=None) + queues.get(w, [])
        # in flight, per worker: the (result index, handle, op) items sent, replies received, the current op's clock
        self._sent: dict[int, list] = {}
        self._got: dict[int, int] = {}
        self._clock: dict[int, float] = {}
        for w, items in queues.items():
            if items:
                self._start(w, items)
        while self._sent:
            by_conn = {self.workers[w].conn: w for w in self._sent}
            by_sentinel = {self.workers[w].process.sentinel: w for w in self._sent}
            wake = min(self._clock[w] + self._limit(w) for w in self._sent)
            ready = wait_connections([*by_conn, *by_sentinel], timeout=max(0.0, wake - time.monotonic()))
            broken: dict[int, BaseException] = {}
            for obj in ready:
                w = by_conn.get(obj)
                if w is None:
                    continue
                try:
                    while w in self._sent and self.workers[w].conn.poll():
                        self._receive(w, self.workers[w].conn.recv(), results)
                except (EOFError, OSError):
                    broken[w] = WorkerDiedError(self._death_note(w))
            for obj in ready:
                w = by_sentinel.get(obj)
                if w is not None and w in self._sent and w not in broken:
                    broken[w] = WorkerDiedError(self._death_note(w))
            now = time.monotonic()
            for w in list(self._sent):
                if w not in broken and now - self._clock[w] > self._limit(w):
                    broken[w] = TimeoutError(f"env call exceeded {self.timeout:.1f}s (worker process killed)")
            for w, error in broken.items():
                if not self.workers[w].ready:
                    self.workers[w].kill()
                    raise RuntimeError(
                        f"Env worker process {w} did not start ({error}). The env factory must be importable and "
                        "picklable in a fresh process (define it in a module, not in __main__ or a notebook), or use "
                        "RolloutConfig(env_workers='threads')."
                    )
                items, k = self._sent.pop(w), self._got.pop(w)
                self._clock.pop(w)
                culprit_i, culprit, _ = items[k]
                if culprit_i is not None:
                    results[culprit_i] = (False, error)
                if culprit is not None:
                    culprit.lost = f"{type(error).__name__}: {error}"
                retry = self._replace(w, culprit) + [item for item in items[k + 1 :] if item[0] is not None]
                if retry:
                    self._start(w, retry)
        return results  # type: ignore[return-value]

    def _limit(self, w: int) -> float:
        return self.timeout if self.workers[w].ready else READY_TIMEOUT_S

    def _start(self, w: int, items: list) -> None:
        """Queue `items` on worker `w` (with its pending closes); sent at once, or when the worker says ready."""
        worker = self.workers[w]
        items = [(None, None, {"op": "close", "slot": s}) for s in worker.pending_closes] + items
        worker.pending_closes = []
        self._sent[w], self._got[w], self._clock[w] = items, 0, time.monotonic()
        if worker.ready:
            self._transmit(w)

    def _transmit(self, w: int) -> None:
        self._clock[w] = time.monotonic()
        try:
            self.workers[w].conn.send({"ops": [op for _, _, op in self._sent[w]]})
        except (BrokenPipeError, OSError):
            pass  # the worker is dead: its sentinel says so next

    def _receive(self, w: int, reply: dict, results: list) -> None:
        worker = self.workers[w]
        if not worker.ready:  # the first message of a new worker
            worker.ready = reply.get("ready", False)
            self._transmit(w)
            return
        i, handle, op = self._sent[w][self._got[w]]
        self._got[w] += 1
        self._clock[w] = time.monotonic()
        ok = reply["ok"]
        value = reply["value"] if ok else _rebuild_error(reply["error"], reply["message"])
        kind = op["op"]
        if kind == "replay":  # rebuilding an episode after its worker was lost
            if not ok or value["obs"] != handle.obs:
                why = value if not ok else "the replay did not reproduce its last observation"
                handle.lost = f"its env was lost with worker process {w} and could not be rebuilt ({why})"
        elif i is not None:
            if handle.lost is not None:  # its replay failed just before
                ok, value = False, WorkerDiedError(handle.lost)
            elif ok and kind == "reset":  # what a replay needs to rebuild this episode on a new worker
                handle.task, handle.commands, handle.obs = TaskSpec(**op["task"]), [], value["obs"]
            elif ok and kind == "act" and value["action"] is not None:
                handle.commands.append(value["action"])
                handle.obs = value["obs"]
            results[i] = (ok, value)
        if self._got[w] == len(self._sent[w]):
            del self._sent[w], self._got[w], self._clock[w]

    def _death_note(self, w: int) -> str:
        self.workers[w].process.join(0.5)
        return f"env worker process {w} died (exit code {self.workers[w].process.exitcode})"

    def _replace(self, w: int, culprit: EnvHandle | None) -> list:
        """Kill worker `w`, start a new one, and return the replays of the episodes it held (culprit excluded)."""
        self.workers[w].kill()
        self.workers[w] = _Worker(self.ctx, self.factory, w)
        replays = []
        for h in list(self.live[w]):
            if h is culprit or h.lost is not None:
                continue
            if h.task is None:  # idle or not reset yet: nothing to rebuild, the new worker makes a fresh env
                continue
            op = {"op": "replay", "slot": h.slot, "task": h.task.to_dict(), "commands": list(h.commands)}
            replays.append((None, h, op))
        return replays

    def close(self, grace_s: float = 2.0) -> None:
        if self.closed:
            return
        self.closed = True
        for worker in self.workers:
            try:
                worker.conn.send({"shutdown": True})  # envs close themselves (JVMs shut down cleanly)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + grace_s
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            worker.kill()
        self.idle.clear()
        _LIVE_POOLS.discard(self)
