"""`ProcessEnvPool`: worker processes, each owning the envs placed on it; one message per worker per turn."""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import signal
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import wait as wait_connections

from ..protocol import EnvFactory, TaskSpec
from .base import EnvHandle, EnvPool, Result
from .wire import WorkerDiedError, _rebuild_error, worker_main

#: Start method of worker processes. Not "fork": the trainer holds torch/CUDA/tokenizer threads, and a forked child
#: can inherit a lock one of them held. "forkserver" forks from a clean server that imported this module once, so
#: a worker starts in milliseconds instead of re-importing torch and TRL (~8 s with "spawn"; docs/benchmarks.md).
DEFAULT_START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
READY_TIMEOUT_S = 300.0  # a worker's imports (torch, TRL, the env package) on a loaded machine


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx, factory: EnvFactory, index: int):
        self.index = index
        # Transport: a multiprocessing Pipe, which PICKLES every message (and the factory goes to the child pickled
        # too). Safe only because both ends are this process tree: unpickling runs code chosen by the sender. Never
        # put this transport behind a socket; a remote worker must speak JSON (the messages are JSON-able dicts).
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
