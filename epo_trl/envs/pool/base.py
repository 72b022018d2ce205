"""The pool interface: handles to live envs and the batched calls every pool answers (`create_pool` in factory.py
picks and builds a pool; this module imports neither)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from ..protocol import EnvFactory, TaskSpec, TextEnv

Result = tuple[bool, Any]  # (ok, value dict | exception)


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
