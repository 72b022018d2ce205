"""Environment workers: who owns the live envs and runs their calls with a timeout, in threads or in processes.

Two pools behind one interface (`EnvPool`, base.py), picked by `RolloutConfig.env_workers` and built by
`create_pool` (factory.py):

- `ThreadEnvPool`: envs live in the trainer process, called from daemon threads. Cheapest; only for envs whose
  separate instances can run concurrently in one interpreter (`EnvFactory.thread_safe = True`, e.g. the maze).
- `ProcessEnvPool`: `num_workers` worker processes, each owning the envs placed on it. Every turn the pool sends
  ONE message per worker holding all of that worker's operations; the worker runs them in order and answers each.
  For envs with process-global state (TextWorld's parser in ALFWorld) or a JVM (ScienceWorld), and for true
  parallelism (no GIL).

A third, `RemoteEnvPool` (remote.py), plays every env as a session on an OpenEnv server (`epo-trl serve-env`, or any
OpenEnv env with a text action), JSON over a WebSocket; `create_pool` builds it when `RolloutConfig.env_server_urls`
is set.

The two local pools run every env call next to its env, as one of three operations (`reset`, `act`, `replay`), and check what
the env returns (`check_*`: a wrong type fails the episode with a message naming the env and the field). A call
that raises, returns garbage or runs past `timeout` fails its episode only. A hung thread cannot be killed: it is
abandoned and replaced (daemon threads, so it never blocks interpreter exit). A hung or dead worker process is
killed with its process group (JVMs included) and replaced; the other episodes it held are rebuilt on the new
worker by replaying their task and commands (envs are deterministic per TaskSpec), or failed if the replay does
not reproduce their last observation.

Wire protocol (plain dicts of str / numbers / bools / lists, i.e. JSON-able). `ProcessEnvPool` carries them over
multiprocessing Pipes, which pickle: fine inside one process tree, but never put that transport behind a socket
(unpickling runs the sender's code); a worker on another machine must exchange these dicts as JSON.

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
                    {"action": str, "obs": str, "reward": float, "terminated": bool, "truncated": bool, "won": bool,
                     "admissible": [str] | None}          admissible: None once the episode ended
"""

from __future__ import annotations

from ..protocol import (
    EnvProtocolError,
    check_admissible,
    check_projection,
    check_reset,
    check_step,
)
from .base import EnvHandle, EnvPool, Result
from .factory import WORKER_KINDS, create_pool, resolve_kind
from .processes import DEFAULT_START_METHOD, READY_TIMEOUT_S, ProcessEnvPool
from .remote import RemoteEnvPool, ServerLostError
from .threads import ThreadEnvPool
from .wire import EnvWorkerError, WorkerDiedError, op_act, op_replay, op_reset, worker_main

__all__ = [
    "DEFAULT_START_METHOD",
    "READY_TIMEOUT_S",
    "WORKER_KINDS",
    "EnvHandle",
    "EnvPool",
    "EnvProtocolError",
    "EnvWorkerError",
    "ProcessEnvPool",
    "RemoteEnvPool",
    "Result",
    "ServerLostError",
    "ThreadEnvPool",
    "WorkerDiedError",
    "check_admissible",
    "check_projection",
    "check_reset",
    "check_step",
    "create_pool",
    "op_act",
    "op_replay",
    "op_reset",
    "resolve_kind",
    "worker_main",
]
