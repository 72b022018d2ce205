"""`create_pool`: which pool runs a factory's envs (threads or worker processes), and building it.

Apart from base.py so that the interface imports neither pool and each pool imports only the interface.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..protocol import EnvFactory
from .base import EnvPool
from .processes import ProcessEnvPool
from .remote import RemoteEnvPool
from .threads import ThreadEnvPool

WORKER_KINDS = ("auto", "threads", "processes")


def resolve_kind(factory: EnvFactory, kind: str) -> str:
    """ "threads" or "processes" for `kind` ("auto" = the factory's `thread_safe`: True -> threads)."""
    if kind not in WORKER_KINDS:
        raise ValueError(f"env_workers={kind!r}: use one of {WORKER_KINDS}.")
    if kind == "auto":
        return "threads" if getattr(factory, "thread_safe", True) else "processes"
    return kind


def create_pool(
    factory: EnvFactory,
    num_workers: int = 8,
    timeout: float = 60.0,
    kind: str = "auto",
    urls: Sequence[str] | None = None,
    **kwargs,
) -> EnvPool:
    """A pool of `kind` ("threads", "processes" or "auto") running `factory`'s envs; `kwargs` go to the pool class
    (e.g. `start_method=` for processes). `urls`: OpenEnv servers to play on instead (`RemoteEnvPool`; `kind` is
    then what the servers run)."""
    if urls:
        return RemoteEnvPool(factory, num_workers, timeout, urls=urls)
    cls = ThreadEnvPool if resolve_kind(factory, kind) == "threads" else ProcessEnvPool
    return cls(factory, num_workers, timeout, **kwargs)
