"""Any `EnvFactory` as an OpenEnv server: `epo-trl serve-env ENV --port P --max_sessions N`.

OpenEnv (`openenv` 0.10) serves an environment as a FastAPI app (`create_app`): a WebSocket session endpoint `/ws`
(one live environment per connection, up to `max_concurrent_envs`), plus `/reset`, `/step`, `/state`, `/schema` and
`/health`. This module supplies the environment class it serves: each session owns one env of the factory, run in a
one-env pool of its own (`create_pool(factory, 1, ...)`: threads for thread-safe envs, a worker process for the
others), so a session's env is isolated from the others, a hung call times out and a crashed env is reported, all as
in a local rollout. The env's outputs go through protocol.py's checks (`op_reset` / `op_act`) before they leave.

The wire format (what a plain OpenEnv client sends and reads):

    reset  {"type": "reset", "data": {"task": "maze|trail|0|3"}}      a TaskSpec key, or
           {"type": "reset", "data": {"split": "valid_seen", "index": 2}}, or {"data": {"seed": 5}} (train task 5)
    step   {"type": "step", "data": {"text": "go north"}}              the model's action text
    reply  {"type": "observation", "data": {"observation": {"text", "goal", "task", "action", "admissible",
            "terminated", "truncated", "won"}, "reward": float, "done": bool}}
           {"type": "error", "data": {"message": "TypeName: message", "code": ...}}    the session's env is gone;
                                                                                      reset to start again

`action` is the command the env accepted (after `project_action`), or null when it rejected the text: no step was
taken, the observation is unchanged and the turn is invalid (reward 0).
"""

from __future__ import annotations

import threading
from typing import Any

from openenv.core.env_server.http_server import create_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State
from pydantic import Field

from .pool.factory import create_pool
from .protocol import EnvFactory, TaskSpec


class TextAction(Action):
    """The model's action text (the env's `project_action` maps it to a command)."""

    text: str = Field(description="The action text, e.g. 'go north' or one of the admissible actions.")


class TextObservation(Observation):
    """One observation of a text env (reward and done are OpenEnv's own fields)."""

    text: str = Field(default="", description="What the agent sees now.")
    goal: str = Field(default="", description="The task description (from reset).")
    task: str = Field(default="", description="The TaskSpec key this session plays.")
    action: str | None = Field(default=None, description="The command taken; null = the env rejected the text.")
    admissible: list[str] | None = Field(default=None, description="Valid commands now; null = not offered/ended.")
    terminated: bool = Field(default=False, description="The task's rules ended the episode (won or lost).")
    truncated: bool = Field(default=False, description="The env's own step limit cut the episode off.")
    won: bool = Field(default=False, description="The episode was won (only on a terminating step).")


class TextState(State):
    task: str | None = Field(default=None, description="The TaskSpec key of the current episode.")
    done: bool = Field(default=False, description="Whether the current episode has ended.")


class EnvCallError(RuntimeError):
    """An env call failed on the server; the message starts with the original exception's type name."""


class _Tasks:
    """Task lists per split, computed once per server (a JVM env's lists are not free)."""

    def __init__(self, factory: EnvFactory):
        self.factory, self.lists, self.lock = factory, {}, threading.Lock()

    def resolve(self, task: str | None, split: str | None, index: int | None, seed: int | None) -> TaskSpec:
        if task is not None:
            spec = TaskSpec.parse(task)
            if spec.env != self.factory.name:
                raise ValueError(f"task {task!r} is for env {spec.env!r}; this server serves {self.factory.name!r}")
            return spec
        split = split or "train"
        position = index if index is not None else (seed or 0)
        with self.lock:
            if split not in self.lists:
                self.lists[split] = self.factory.tasks(split)
            tasks = self.lists[split]
        if not tasks:
            raise ValueError(f"env {self.factory.name!r} has no tasks in split {split!r}")
        if index is not None and not 0 <= index < len(tasks):
            raise ValueError(f"index {index} is out of range: split {split!r} has {len(tasks)} tasks")
        return tasks[position % len(tasks)]


def served_env_class(factory: EnvFactory, kind: str = "auto", timeout: float = 60.0) -> type:
    """The OpenEnv `Environment` class serving `factory`: one env per session (see the module docstring)."""
    tasks = _Tasks(factory)

    class ServedEnv(Environment[TextAction, TextObservation, TextState]):
        # Every session owns its env in a pool of its own, so sessions share nothing mutable.
        SUPPORTS_CONCURRENT_SESSIONS = True

        def __init__(self):
            super().__init__()
            self._pool = None  # made at the first reset: /state and /metadata build an instance they never reset
            self._handle = None
            self._last: TextObservation | None = None
            self._state = TextState()

        def _fail(self, error: BaseException) -> EnvCallError:
            self._pool.discard(self._handle)
            self._handle, self._last = None, None
            self._state = TextState(episode_id=self._state.episode_id, task=self._state.task, done=True)
            return EnvCallError(f"{type(error).__name__}: {error}")

        def reset(
            self,
            seed: int | None = None,
            episode_id: str | None = None,
            task: str | None = None,
            split: str | None = None,
            index: int | None = None,
            **kwargs: Any,
        ) -> TextObservation:
            try:
                spec = tasks.resolve(task, split, index, seed)
            except ValueError as e:
                raise EnvCallError(f"ValueError: {e}") from None
            if self._pool is None:
                self._pool = create_pool(factory, 1, timeout, kind)
            if self._handle is None:
                self._handle = self._pool.acquire()
            ok, value = self._pool.reset([(self._handle, spec)])[0]
            if not ok:
                raise self._fail(value)
            self._state = TextState(episode_id=episode_id, task=spec.key())
            self._last = TextObservation(
                text=value["obs"], goal=value["goal"], task=spec.key(), admissible=value["admissible"], reward=0.0
            )
            return self._last

        def step(self, action: TextAction, timeout_s: float | None = None, **kwargs: Any) -> TextObservation:
            if self._last is None:
                raise EnvCallError("RuntimeError: no episode in progress in this session: reset first")
            if self._state.done:
                raise EnvCallError("RuntimeError: the episode is over: reset to start another")
            ok, value = self._pool.act([(self._handle, action.text)])[0]
            if not ok:
                raise self._fail(value)
            last = self._last
            if value["action"] is None:  # rejected by project_action: no step, same state, an invalid turn
                return TextObservation(
                    text=last.text, goal=last.goal, task=last.task, admissible=last.admissible, reward=0.0
                )
            done = value["terminated"] or value["truncated"]
            self._state = TextState(
                episode_id=self._state.episode_id, task=last.task, done=done, step_count=self._state.step_count + 1
            )
            self._last = TextObservation(
                text=value["obs"],
                goal=last.goal,
                task=last.task,
                action=value["action"],
                admissible=value["admissible"],
                terminated=value["terminated"],
                truncated=value["truncated"],
                won=value["won"],
                reward=value["reward"],
                done=done,
            )
            return self._last

        @property
        def state(self) -> TextState:
            return self._state

        def close(self) -> None:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    ServedEnv.__name__ = ServedEnv.__qualname__ = f"Served{type(factory).__name__.removesuffix('Factory')}Env"
    return ServedEnv


def build_app(factory: EnvFactory, max_sessions: int = 8, kind: str = "auto", timeout: float = 60.0):
    """The FastAPI app serving `factory` with at most `max_sessions` concurrent sessions."""
    if max_sessions < 1:
        raise ValueError(f"max_sessions={max_sessions}: must be >= 1")
    env_cls = served_env_class(factory, kind, timeout)
    return create_app(env_cls, TextAction, TextObservation, env_name=factory.name, max_concurrent_envs=max_sessions)


def serve(
    factory: EnvFactory,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_sessions: int = 8,
    kind: str = "auto",
    timeout: float = 60.0,
    log_level: str = "warning",
) -> None:
    """Run the server in this process until it is stopped (uvicorn)."""
    import uvicorn

    uvicorn.run(build_app(factory, max_sessions, kind, timeout), host=host, port=port, log_level=log_level)
