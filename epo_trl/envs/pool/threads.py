"""`ThreadEnvPool`: envs in the trainer process, called from daemon threads (thread-safe envs only)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

from ..protocol import EnvFactory, TextEnv
from .base import EnvHandle, EnvPool, Result
from .wire import _quiet_close, op_act, op_reset


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
            self.spawn()

    def spawn(self) -> None:
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
            self.spawn()

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
