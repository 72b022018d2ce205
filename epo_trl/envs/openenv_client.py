"""Playing a served env (`epo-trl serve-env`) through OpenEnv's own client, e.g. inside TRL's tool loop.

    from epo_trl.envs.openenv_client import TextEnvClient, TextAction

    with TextEnvClient(base_url="http://node1:8001").sync() as env:       # a plain OpenEnv client
        result = env.reset(task="maze|trail|3|100001")                      # or reset(split="valid_seen", index=2)
        result = env.step(TextAction(text="go west"))
        result.observation.text, result.reward, result.done, result.observation.won

    # TRL's `environment_factory` playing served envs: the factory's tasks and header, the servers' envs
    from epo_trl.envs.trl_env import tool_dataset, trl_environment
    factory = OpenEnvFactory(make_factory("maze"), ["http://node1:8001", "http://node2:8001"])
    GRPOTrainer(..., train_dataset=tool_dataset(factory), environment_factory=trl_environment(factory))

(Rollouts of our own trainers use `RolloutConfig.env_server_urls` instead: `pool/remote.py`.)
"""

from __future__ import annotations

import atexit
import itertools
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from openenv.core.client_types import StepResult
from openenv.core.env_client import EnvClient

from .openenv_server import TextAction, TextObservation, TextState
from .pool.remote import server_urls
from .protocol import EnvFactory, TaskSpec, TextEnv

__all__ = ["OpenEnvFactory", "OpenEnvTextEnv", "TextAction", "TextEnvClient", "TextObservation", "TextState"]


class TextEnvClient(EnvClient[TextAction, TextObservation, TextState]):
    """OpenEnv's client for `epo-trl serve-env` servers (one session per client)."""

    def _step_payload(self, action: TextAction) -> dict[str, Any]:
        return {"text": action.text}

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[TextObservation]:
        obs = TextObservation(**payload["observation"], reward=payload.get("reward"), done=payload.get("done", False))
        return StepResult(observation=obs, reward=payload.get("reward"), done=payload.get("done", False))

    def _parse_state(self, payload: dict[str, Any]) -> TextState:
        return TextState(**payload)


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_sessions() -> None:
    # Before the interpreter freezes daemon threads: a sync client's close runs on its event-loop thread, and a close
    # left to a __del__ at shutdown (TRL's environment instances) would wait on a frozen thread forever.
    for env in list(_LIVE):
        env.close()


def _close_client(client) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - a dead server's session need not close cleanly
        pass


class OpenEnvTextEnv(TextEnv):
    """A `TextEnv` whose env lives on a server: one OpenEnv session, opened at the first reset."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.url, self.timeout = url, timeout
        self.client = None
        self.last: TextObservation | None = None

    def reset(self, task: TaskSpec) -> tuple[str, dict[str, Any]]:
        if self.client is None:
            http, _ = server_urls(self.url)
            self.client = TextEnvClient(base_url=http, message_timeout_s=self.timeout).sync()
            self.client.connect()
            _LIVE.add(self)
        self.last = self.client.reset(task=task.key()).observation
        return self.last.text, {"goal": self.last.goal}

    def admissible_actions(self) -> list[str] | None:
        return self.last.admissible if self.last is not None else None

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        obs = self.client.step(TextAction(text=action)).observation
        self.last = obs  # a rejected text (obs.action None) leaves the state as it was: reward 0, not over
        return obs.text, float(obs.reward or 0.0), obs.terminated, obs.truncated, {"won": obs.won}

    def close(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        _LIVE.discard(self)
        # bounded: the client's close waits on its event-loop thread, which may be stuck or, at shutdown, frozen
        try:
            closer = threading.Thread(target=_close_client, args=(client,), daemon=True)
            closer.start()
            closer.join(5.0)
        except RuntimeError:  # no new threads at interpreter shutdown: the session ends with the process
            pass


class OpenEnvFactory(EnvFactory):
    """`base`'s tasks, name and prompt header; its envs on the servers at `urls` (each `make` takes the next URL)."""

    def __init__(self, base: EnvFactory, urls: Sequence[str], timeout: float = 60.0):
        if not urls:
            raise ValueError("OpenEnvFactory needs at least one server URL")
        for url in urls:
            server_urls(url)  # a malformed URL fails here, not at the first episode
        self.base, self.urls, self.timeout = base, list(urls), timeout
        self.name, self.prompt_header = base.name, base.prompt_header
        self._next = itertools.cycle(self.urls)
        self._lock = threading.Lock()

    def make(self) -> TextEnv:
        with self._lock:
            url = next(self._next)
        return OpenEnvTextEnv(url, self.timeout)

    def tasks(self, split: str = "train") -> list[TaskSpec]:
        return self.base.tasks(split)

    def task_types(self) -> list[str]:
        return self.base.task_types()

    def task_type(self, task: TaskSpec) -> str:
        return self.base.task_type(task)
