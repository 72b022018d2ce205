"""`RemoteEnvPool`: episodes stepped on OpenEnv servers (`epo-trl serve-env`, or any OpenEnv env with a text action).

Each live env is one OpenEnv WebSocket session (`ws://HOST:PORT/ws`: the server gives every connection its own env);
a handle keeps its session across episodes, like the local pools keep their envs. A new session goes to the live
server holding the fewest of this pool's sessions. Calls run on daemon threads, one message and one reply per call,
with `timeout` per call (a new session's first reset: at least SESSION_START_S, as the server builds its env then). The messages are OpenEnv's JSON (never pickle):

    reset  {"type": "reset", "data": {"task": TaskSpec.key(), "seed": int}}   (a server drops what its reset lacks)
    step   {"type": "step", "data": {ACTION_FIELD: text}}     ACTION_FIELD: the action's one string field (/schema)
    reply  {"type": "observation", "data": {"observation": {...}, "reward": float | null, "done": bool}}
           {"type": "error", "data": {"message": str, "code": str}}

An observation from `epo-trl serve-env` carries text, goal, admissible, action (null = rejected by the env's
`project_action`), terminated, truncated and won. From another OpenEnv env: the text is its first string field among
TEXT_FIELDS (else the observation as JSON), terminated = done, `won` is read from the observation or its metadata
(False when absent), and the action is the stripped text. Either way the values pass protocol.py's checks.

Faults fail the episode they hit, reported like a crashed local env (the engine counts it in `rollout/env_failures`):
an error reply (the server's exception type and message), a malformed reply (`EnvProtocolError`), a call past
`timeout` (`TimeoutError`), a dropped connection or a server that is gone (`ServerLostError`), every server at its
session limit. A server that refuses connections, or stops answering its health check after a timeout or a dropped
connection, is left out for the rest of the run with one warning; new sessions go to the others.
"""

from __future__ import annotations

import json
import math
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from typing import Any

from ..protocol import EnvFactory, EnvProtocolError, TaskSpec, check_admissible, check_reset, check_step
from .base import EnvHandle
from .threads import ThreadEnvPool
from .wire import WorkerDiedError, _rebuild_error

#: Observation fields read as the text of another OpenEnv env's observation, in this order.
TEXT_FIELDS = ("text", "observation", "message", "content", "prompt")
CONNECT_TIMEOUT_S = 10.0
#: The first reset of a new session may wait this long (at least): the server builds the session's env then (a worker
#: process, a JVM), as the local process pool gives a new worker READY_TIMEOUT_S to start.
SESSION_START_S = 120.0
HEALTH_TIMEOUT_S = 3.0
MAX_IN_FLIGHT = 256  # calls waiting on replies at once (threads)


class ServerLostError(WorkerDiedError):
    """The env server holding an episode's session dropped it or is gone (the remote worker died)."""


class _Full(Exception):
    """The server refused a new session: it holds its `--max_sessions`."""


def server_urls(url: str) -> tuple[str, str]:
    """(http base, WebSocket endpoint) of an env server URL (http://, https://, ws:// or wss://, with host and port);
    a ValueError naming the URL otherwise."""
    parts = urllib.parse.urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname or port is None:
        raise ValueError(f"env server URL {url!r} is not of the form http://HOST:PORT (or ws://, https://, wss://)")
    secure = parts.scheme in ("https", "wss")
    base = f"{parts.hostname}:{port}{parts.path.rstrip('/')}"
    return f"{'https' if secure else 'http'}://{base}", f"{'wss' if secure else 'ws'}://{base}/ws"


def _get_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - the user's server URLs
        return json.loads(response.read())


def probe_servers(urls: Sequence[str], timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Raise a ValueError naming the first URL that is malformed or whose server does not answer /health."""
    for url in urls:
        http, _ = server_urls(url)
        try:
            _get_json(f"{http}/health", timeout)
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise ValueError(f"env server {url} is unreachable ({reason})") from None


def action_field(schema: Any, url: str) -> str:
    """The string field of an OpenEnv action schema the action text goes into ('text' for our servers)."""
    props = (schema or {}).get("action", {}).get("properties", {}) if isinstance(schema, dict) else {}
    strings = [k for k, v in props.items() if k != "metadata" and isinstance(v, dict) and v.get("type") == "string"]
    if "text" in strings or not props:
        return "text"
    if len(strings) == 1:
        return strings[0]
    raise ValueError(
        f"env server {url}: its action has no single string field to carry the action text (fields: {sorted(props)})"
    )


class _Server:
    def __init__(self, index: int, url: str):
        self.index, self.url = index, url
        self.http, self.ws = server_urls(url)
        self.sessions = 0  # this pool's sessions on it
        self.capacity: int | None = None  # learnt when it refuses a session
        self.dead: str | None = None
        self.field = "text"


class _Session:
    """One OpenEnv WebSocket session: one env on the server."""

    def __init__(self, server: _Server, timeout: float):
        from websockets.sync.client import connect

        self.server = server
        # no keepalive pings: a step may legitimately block the server's event loop thread for a while; the per-call
        # timeout is the liveness check
        self.ws = connect(server.ws, open_timeout=min(timeout, CONNECT_TIMEOUT_S), ping_interval=None).__enter__()

    def call(self, message: dict, timeout: float) -> Any:
        from websockets.exceptions import ConnectionClosed

        try:
            self.ws.send(json.dumps(message))
        except ConnectionClosed:
            pass  # a server that refuses the session says why and closes; its reply is still queued: read it
        raw = self.ws.recv(timeout=timeout)
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            raise EnvProtocolError(
                f"env server {self.server.url} sent a reply that is not JSON: {raw!r:.80}"
            ) from None

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - a dead connection's close must not break training
            pass


class RemoteEnvPool(ThreadEnvPool):
    """Sessions on the OpenEnv servers at `urls`, balanced across them; see the module docstring."""

    kind = "remote"

    def __init__(self, factory: EnvFactory, num_workers: int = 8, timeout: float = 60.0, urls: Sequence[str] = ()):
        if not urls:
            raise ValueError("RemoteEnvPool needs at least one env server URL")
        # ThreadEnvPool's watchdog abandons a call at `timeout`; the calls here end themselves (the reply wait: `timeout`,
        # a new session's first reset SESSION_START_S), so the watchdog only catches a connect or send that hangs.
        super().__init__(factory, num_workers, max(timeout, SESSION_START_S) + CONNECT_TIMEOUT_S + 1.0)
        self.call_timeout = timeout
        self.in_flight = num_workers
        self.servers = [_Server(i, url) for i, url in enumerate(urls)]
        self.lock = threading.Lock()
        for server in self.servers:
            try:
                schema = _get_json(f"{server.http}/schema", HEALTH_TIMEOUT_S)
            except (OSError, ValueError) as e:  # down since the config's check, or not an OpenEnv server
                self._lose(server, f"no /schema ({getattr(e, 'reason', None) or e})")
                continue
            server.field = action_field(schema, server.url)  # an env whose action cannot carry text: a config error

    # -- servers --
    def _lose(self, server: _Server, why: str) -> None:
        with self.lock:
            if server.dead is not None:
                return
            server.dead = why
        live = sum(s.dead is None for s in self.servers)
        warnings.warn(
            f"env server {server.url} is left out for the rest of this run ({why}); its episodes in flight fail, "
            f"new sessions go to the {live} other live server(s)",
            RuntimeWarning,
            stacklevel=2,
        )

    def _healthy(self, server: _Server) -> bool:
        try:
            _get_json(f"{server.http}/health", HEALTH_TIMEOUT_S)
            return True
        except (OSError, ValueError):
            return False

    def _pick(self, exclude: set[int]) -> _Server:
        """The live server with the fewest of our sessions and room for one more; reserves the session."""
        with self.lock:
            candidates = [
                s
                for s in self.servers
                if s.dead is None and s.index not in exclude and (s.capacity is None or s.sessions < s.capacity)
            ]
            if not candidates:
                full = [f"{s.url} (max {s.capacity} sessions)" for s in self.servers if s.dead is None]
                if full:
                    raise RuntimeError(f"every env server is at its session limit: {', '.join(full)}")
                dead = [f"{s.url} ({s.dead})" for s in self.servers if s.dead is not None]
                raise ServerLostError(f"no env server left: {'; '.join(dead)}")
            server = min(candidates, key=lambda s: (s.sessions, s.index))
            server.sessions += 1
            return server

    def _drop(self, handle: EnvHandle) -> None:
        session, handle.env = handle.env, None
        if session is not None:
            with self.lock:
                session.server.sessions -= 1
            threading.Thread(target=session.close, daemon=True).start()

    # -- handles --
    def acquire(self) -> EnvHandle:
        return self.idle.pop() if self.idle else EnvHandle()  # the session is opened at reset, on a worker thread

    def discard(self, handle: EnvHandle | None) -> None:
        if handle is not None:
            self._drop(handle)

    # -- calls --
    def reset(self, items):
        self._grow(len(items))
        # Placement here, in order, not on the worker threads: the same batch lands on the same servers every time.
        placed: dict[int, _Server | BaseException] = {}
        for i, (h, _) in enumerate(items):
            if h.env is not None and h.env.server.dead is not None:
                self._drop(h)
            if h.env is None:
                try:
                    placed[i] = self._pick(set())
                except (RuntimeError, ServerLostError) as e:
                    placed[i] = e
        return self._run(
            [lambda h=h, t=t, i=i: self._reset_one(h, t, placed.get(i)) for i, (h, t) in enumerate(items)]
        )

    def act(self, items):
        self._grow(len(items))
        return self._run([lambda h=h, x=x: self._act_one(h, x) for h, x in items])

    def _grow(self, calls: int) -> None:
        """As many threads as a turn has calls (up to MAX_IN_FLIGHT): each only waits on its server's reply, so a
        remote turn takes one round trip, not `calls / num_workers` of them."""
        for _ in range(min(calls, MAX_IN_FLIGHT) - self.in_flight):
            self.threads.spawn()
        self.in_flight = max(self.in_flight, min(calls, MAX_IN_FLIGHT))

    def _call(self, handle: EnvHandle, message: dict, timeout: float | None = None) -> tuple[dict, Any, Any]:
        """Send `message` on the handle's session; the reply's (observation, reward, done). Faults raise."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        session: _Session = handle.env
        server = session.server
        timeout = timeout or self.call_timeout
        try:
            reply = session.call(message, timeout)
        except TimeoutError:
            if not self._healthy(server):
                self._lose(server, f"no reply within {timeout:g}s and no answer to /health")
            raise TimeoutError(f"env server {server.url}: no reply within {timeout:g}s") from None
        except (ConnectionClosed, InvalidHandshake, OSError) as e:
            if not self._healthy(server):
                self._lose(server, f"connection dropped ({type(e).__name__}) and no answer to /health")
            raise ServerLostError(f"env server {server.url} dropped the session ({type(e).__name__}: {e})") from None
        return self._parse(server, reply)

    def _parse(self, server: _Server, reply: Any) -> tuple[dict, Any, Any]:
        where = f"env server {server.url}"
        if not isinstance(reply, dict) or not isinstance(reply.get("data"), dict):
            raise EnvProtocolError(f"{where} sent {reply!r:.80}; expected an OpenEnv message with a 'data' object")
        data = reply["data"]
        if reply.get("type") == "error":
            if data.get("code") == "CAPACITY_REACHED":
                raise _Full(str(data.get("message", "")))
            message = str(data.get("message", "(no message)"))
            name, sep, rest = message.partition(": ")
            if sep and name.isidentifier():  # `epo-trl serve-env` sends "TypeName: message"
                raise _rebuild_error(name, rest)
            raise RuntimeError(f"{where}: {message}")
        if reply.get("type") != "observation" or not isinstance(data.get("observation"), dict):
            raise EnvProtocolError(f"{where} sent {reply!r:.80}; expected an observation message")
        return data["observation"], data.get("reward"), data.get("done")

    def _open(self, handle: EnvHandle, message: dict, server: _Server | None) -> tuple[dict, Any, Any]:
        """A fresh session on `server` (reserved by `_pick`; None: pick one now) and `message` (the reset) on it; a
        server that refuses or is full hands the session to the next least loaded live one."""
        tried: set[int] = set()
        while True:
            if server is None:
                server = self._pick(tried)
            tried.add(server.index)
            try:
                handle.env = _Session(server, self.call_timeout)
            except Exception as e:  # noqa: BLE001 - refused, unreachable, handshake failed: the server is out
                with self.lock:
                    server.sessions -= 1
                self._lose(server, f"cannot connect ({type(e).__name__}: {e})")
                server = None
                continue
            try:
                return self._call(handle, message, max(self.call_timeout, SESSION_START_S))
            except _Full as e:
                with self.lock:
                    server.capacity = server.sessions - 1
                self._drop(handle)
                server = None
                if all(s.index in tried or s.dead is not None for s in self.servers):
                    raise RuntimeError(f"every env server is at its session limit ({e})") from None

    def _reset_one(self, handle: EnvHandle, task: TaskSpec, placed: _Server | BaseException | None) -> dict:
        if isinstance(placed, BaseException):
            raise placed
        message = {"type": "reset", "data": {"task": task.key(), "seed": task.seed}}
        if handle.env is None:
            observation, _, _ = self._open(handle, message, placed)
        else:
            try:
                observation, _, _ = self._call(handle, message)
            except ServerLostError:  # an idle session the server closed meanwhile: open another
                self._drop(handle)
                observation, _, _ = self._open(handle, message, None)
        obs, goal = check_reset(self.name, (_text(observation), {"goal": observation.get("goal", "")}))
        return {"obs": obs, "goal": goal, "admissible": check_admissible(self.name, observation.get("admissible"))}

    def _act_one(self, handle: EnvHandle, text: str) -> dict:
        if handle.env is None:
            raise ServerLostError("the episode's session is gone")
        session: _Session = handle.env
        if not text.strip():  # what the default `project_action` rejects, without a round trip
            return {"action": None}
        observation, reward, done = self._call(handle, {"type": "step", "data": {session.server.field: text}})
        if "action" in observation:  # `epo-trl serve-env`: the command the env's `project_action` made of the text
            action = observation["action"]
            if action is None:
                return {"action": None}
        else:
            action = text.strip()
        metadata = observation.get("metadata") if isinstance(observation.get("metadata"), dict) else {}
        reward = 0.0 if reward is None else reward
        if isinstance(reward, float) and not math.isfinite(reward):
            raise EnvProtocolError(f"env server {session.server.url} sent reward {reward}")
        terminated = observation.get("terminated", done)
        truncated = observation.get("truncated", False)
        won = observation["won"] if "won" in observation else metadata.get("won", False)
        step = check_step(self.name, (_text(observation), reward, terminated, truncated, {"won": won}))
        ended = step.terminated or step.truncated
        admissible = None if ended else check_admissible(self.name, observation.get("admissible"))
        if not isinstance(action, str):
            raise EnvProtocolError(f"env server {session.server.url} sent action {action!r:.80}; expected a str")
        return {"action": action, **step._asdict(), "admissible": admissible}

    def close(self) -> None:
        # closed before returning (each in a thread of its own, a dead server's close gives up after 2 s): a server's
        # session count must be free again when this returns, e.g. for the next pool of the same run
        closing = []
        for handle in self.idle:
            session, handle.env = handle.env, None
            if session is not None:
                closing.append(threading.Thread(target=session.close, daemon=True))
                closing[-1].start()
        for thread in closing:
            thread.join(2.0)
        self.idle.clear()
        self.threads.shutdown()


def _text(observation: dict) -> Any:
    for key in TEXT_FIELDS:
        if key in observation:
            return observation[key]
    return json.dumps({k: v for k, v in observation.items() if k != "metadata"}, sort_keys=True)
