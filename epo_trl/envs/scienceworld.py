"""ScienceWorld (Wang et al., 2022) behind the `TextEnv` protocol.

Wraps the `scienceworld` package (a Scala simulator in a JVM, driven through py4j). What this adapter
adds over `ScienceWorldEnv`:

- a lean `step`: the package's `step` rebuilds the whole valid-action list (hundreds to thousands of
  entries, ~60 ms) on every call; we call the server's step + score + completed (~10 ms) and build the
  list only when `admissible_actions()` asks for it (cached for the current state);
- a lean `reset`: the server's `reset` just re-runs `load`, so `reset(task)` loads once;
- win/loss as the paper counts it: won = the task is completed; a wrong "focus on" (score -100) ends the
  episode as a loss; reward 10 on a win, 0 otherwise;
- a bounded JVM (`JAVA_TOOL_OPTIONS=-Xmx512m -XX:+UseSerialGC` by default, ~240 MB instead of ~880 MB);
- a crashed JVM is reported by `step` (`ScienceWorldCrashedError`) and restarted by the next `reset`;
- the JVM's py4j gateway requires an auth token (`jvm_gateway.require_auth`, applied in `_import_scienceworld`):
  without it any local user could connect to its port and run commands as the trainer's user;
- splits: train = train variations of the seen task types, valid_seen (IID) = test variations of the
  seen task types, valid_unseen (OOD) = test variations of held-out task types;
- `content_key(task)` names the world a variation builds (task, goal, first observation, the simulator's whole object
  tree), so held-out splits can be checked to be unseen by content, not only by variation index.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .jvm_gateway import check_auth, require_auth
from .protocol import EnvFactory, TaskSpec, TextEnv

#: Task types held out of training by default and played in `valid_unseen` (OOD). One per topic family,
#: so each held-out type has a trained sibling (e.g. boil/melt are trained, freeze is held out). This is
#: our choice, not RLVMR's exact L2 list; pass `held_out_tasks=` to change it.
DEFAULT_HELD_OUT_TASKS: tuple[str, ...] = (
    "freeze",
    "chemistry-mix-paint-tertiary-color",
    "find-non-living-thing",
    "grow-fruit",
    "identify-life-stages-2",
    "inclined-plane-friction-unnamed-surfaces",
    "lifespan-shortest-lived",
    "measure-melting-point-unknown-substance",
    "mendelian-genetics-unknown-plant",
    "test-conductivity-of-unknown-substances",
)

SCIENCEWORLD_PROMPT_HEADER = (
    "You are an expert agent playing ScienceWorld, a text-based simulation of an elementary-school science "
    "world with rooms (kitchen, greenhouse, workshop, ...), objects, substances, plants and animals. You act "
    "with short text commands such as 'look around', 'go to kitchen', 'open door to hallway', 'pick up "
    "thermometer', 'move apple to red box', 'use thermometer on water', 'activate stove' or 'focus on water'. "
    "'focus on X' tells the simulator which object the task is about: focusing on the wrong object ends the "
    "episode as a failure, so only focus on what the task asks for."
)

_UNKNOWN_ACTION = "No known action matches that input."
# Java's -Xmx syntax: a number with an optional k/m/g unit.
_HEAP_RE = re.compile(r"^\d+[kKmMgG]?$")
_JVM_ENV_LOCK = threading.Lock()  # JAVA_TOOL_OPTIONS is process-global while a JVM starts
_VARIATIONS: dict[str, dict[str, list[int]]] = {}  # task name -> {"train"|"dev"|"test": variations}
_VARIATIONS_LOCK = threading.Lock()


class ScienceWorldCrashedError(RuntimeError):
    """The ScienceWorld JVM died or its bridge failed during a step; the next `reset` restarts it."""


def _import_scienceworld():
    try:
        import scienceworld
    except ImportError as e:
        raise ImportError(
            "The ScienceWorld environment needs the scienceworld package (and a Java runtime): "
            "pip install 'epo-trl[scienceworld]'."
        ) from e
    require_auth(sys.modules[scienceworld.ScienceWorldEnv.__module__])  # its JVM gateway takes a token
    return scienceworld


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(
            "ScienceWorld runs in a Java virtual machine, but no `java` executable is on PATH. Install a Java "
            "runtime >= 11 (Debian/Ubuntu: `apt-get install default-jre-headless`; conda: `conda install "
            "openjdk`) and make sure `java -version` works in this shell."
        )
    return java


def all_task_names() -> list[str]:
    """The 30 ScienceWorld task names, read from the package (no JVM needed)."""
    _import_scienceworld()
    from scienceworld.constants import ID2TASK

    return sorted(ID2TASK.values())


def _canonical(names, what: str) -> list[str]:
    from scienceworld.utils import infer_task

    known = set(all_task_names())
    out = []
    for name in names:
        task = infer_task(name)
        if task not in known:
            raise ValueError(f"Unknown ScienceWorld task {name!r} in {what}. Known tasks: {sorted(known)}.")
        if task not in out:
            out.append(task)
    return out


def _java_tool_options(jvm_max_heap: str | None, java_tool_options: str | None) -> str | None:
    if java_tool_options is not None:
        return java_tool_options
    if jvm_max_heap is None:
        return None
    if not _HEAP_RE.match(str(jvm_max_heap)):
        raise ValueError(f"jvm_max_heap={jvm_max_heap!r} is not a Java heap size; use e.g. '512m' or '2g'.")
    return f"-Xmx{jvm_max_heap} -XX:+UseSerialGC"


def _start_jvm(env_step_limit: int, tool_options: str | None):
    """Start one ScienceWorld simulator (one JVM), with JAVA_TOOL_OPTIONS set only while it launches."""
    _require_java()
    _import_scienceworld()
    from scienceworld import ScienceWorldEnv

    with _JVM_ENV_LOCK:
        previous = os.environ.get("JAVA_TOOL_OPTIONS")
        if tool_options is not None:
            os.environ["JAVA_TOOL_OPTIONS"] = tool_options
        try:
            sw = ScienceWorldEnv("", envStepLimit=env_step_limit)
            check_auth(sw)
            return sw
        finally:
            if tool_options is not None:
                if previous is None:
                    os.environ.pop("JAVA_TOOL_OPTIONS", None)
                else:
                    os.environ["JAVA_TOOL_OPTIONS"] = previous


def _close_jvm(sw) -> None:
    """Close a ScienceWorldEnv exactly once: its `__del__` closes again, which prints a BrokenPipeError."""
    if sw is None:
        return
    try:
        sw.close()
    except Exception:  # noqa: BLE001 - a dead JVM cannot be closed cleanly; nothing left to release
        pass
    finally:
        sw.close = lambda: None  # make the package's __del__ a no-op


def _jvm_alive(sw) -> bool:
    proc = getattr(getattr(sw, "_gateway", None), "java_process", None)
    return proc is None or proc.poll() is None


def task_variations(task_names: list[str], tool_options: str | None = None) -> dict[str, dict[str, list[int]]]:
    """{task: {"train", "dev", "test": variation indices}}, cached per process (one short-lived JVM)."""
    with _VARIATIONS_LOCK:
        missing = [t for t in task_names if t not in _VARIATIONS]
        if missing:
            sw = _start_jvm(100, tool_options)
            try:
                for task in missing:
                    sw.load(task, 0, "")
                    _VARIATIONS[task] = {
                        "train": sorted(sw.get_variations_train()),
                        "dev": sorted(sw.get_variations_dev()),
                        "test": sorted(sw.get_variations_test()),
                    }
            finally:
                _close_jvm(sw)
        return {t: _VARIATIONS[t] for t in task_names}


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _canonical_tree(node: Any) -> Any:
    """The simulator's object tree without its object ids (`uuid`, the `name-uuid` keys of `contents`): a room's
    contents become a sorted list, so the same world gives the same tree whatever ids the simulator handed out."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "uuid":
                continue
            if key == "contents" and isinstance(value, dict):
                out[key] = sorted(json.dumps(_canonical_tree(v), sort_keys=True) for v in value.values())
            else:
                out[key] = _canonical_tree(value)
        return out
    if isinstance(node, list):
        return [_canonical_tree(v) for v in node]
    return node


class ScienceWorldTextEnv(TextEnv):
    """One live ScienceWorld simulator (one JVM). Not thread-safe; create one per rollout worker."""

    def __init__(
        self,
        simplification: str = "easy",
        env_step_limit: int = 100,
        java_tool_options: str | None = None,
        with_valid_actions: bool = True,
        generate_gold_path: bool = False,
        valid_actions_format: str = "templates",
    ):
        _require_java()
        _import_scienceworld()
        self.simplification = simplification
        self.env_step_limit = env_step_limit
        self.java_tool_options = java_tool_options
        self.with_valid_actions = with_valid_actions
        self.generate_gold_path = generate_gold_path
        self.valid_actions_format = valid_actions_format
        self._sw = None  # started lazily by the first reset, restarted after a crash
        self._broken = False
        self._closed = False
        self._task: TaskSpec | None = None
        self._done = True
        self._valid_cache: list[str] | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def _ensure_jvm(self) -> None:
        if self._sw is not None and (self._broken or not _jvm_alive(self._sw)):
            _close_jvm(self._sw)
            self._sw = None
        if self._sw is None:
            self._sw = _start_jvm(self.env_step_limit, self.java_tool_options)
            self._broken = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _close_jvm(self._sw)
        self._sw = None

    def __del__(self):  # a forgotten env must not leave a JVM behind
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- protocol ---------------------------------------------------------------------------------
    def reset(self, task: TaskSpec) -> tuple[str, dict[str, Any]]:
        if self._closed:
            raise RuntimeError("This ScienceWorld env was closed; create a new one with factory.make().")
        if task.env != "scienceworld":
            raise ValueError(f"ScienceWorld cannot play a task of env {task.env!r}: {task.key()}.")
        for attempt in range(2):
            self._ensure_jvm()
            sw = self._sw
            try:
                # `load` builds a fresh world seeded by the variation; the server's `reset` only loads again.
                sw.load(task.task, task.variation, self.simplification, generateGoldPath=self.generate_gold_path)
                sw.lastStepScore = 0
                obs = sw.server.step("look around")  # a free action: the first observation, no move spent
                goal = sw.server.getTaskDescription()
                break
            except Exception as e:
                if not _is_bridge_error(e) or attempt == 1:
                    raise
                self._broken = True  # the JVM died since the last check: restart it once, transparently
        self._task = task
        self._done = False
        self._valid_cache = None
        info = {"goal": goal, "won": False, "score": 0, "moves": 0, "task": task.task, "variation": task.variation}
        return obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Terminated: completed (won) or failed (lost); truncated: the simulator's move limit passed first."""
        if self._task is None or self._done:
            raise RuntimeError("step() called on a finished (or never started) ScienceWorld episode; call reset().")
        server = self._sw.server
        try:
            obs = server.step(action)
            score = int(round(100 * server.getScore()))
            completed = bool(server.getCompleted())
            moves = int(server.getNumMoves())
        except Exception as e:
            if not _is_bridge_error(e):
                raise
            self._broken = True
            self._done = True
            raise ScienceWorldCrashedError(
                f"The ScienceWorld JVM failed during step({action!r}) on task {self._task.key()}: {e!r}. "
                "Count this episode as failed; the next reset() restarts the simulator."
            ) from e
        self._valid_cache = None
        failed = score < 0  # e.g. a wrong "focus on": the simulator scores -100 and the task is lost
        won = completed and not failed
        terminated = won or failed or completed
        truncated = not terminated and moves > self.env_step_limit
        self._done = terminated or truncated
        info = {"won": won, "score": score, "moves": moves, "failed": failed}
        return obs, (10.0 if won else 0.0), terminated, truncated, info

    def admissible_actions(self) -> list[str] | None:
        """Valid action-object combinations in the current state (built on demand, cached until the next step)."""
        if not self.with_valid_actions or self._sw is None or self._task is None:
            return None
        if self._valid_cache is None:
            server = self._sw.server
            if self.valid_actions_format == "templates":
                # RLVMR-style compact hint: ~25 templates + the visible objects instead of up to ~1,300 combinations
                objects = "; ".join(dict.fromkeys(server.getPossibleObjects()))
                self._valid_cache = list(dict.fromkeys(server.getPossibleActions())) + [f"(OBJ is one of: {objects})"]
            else:  # dict.fromkeys: drop duplicates, keep the simulator's order
                self._valid_cache = list(dict.fromkeys(server.getValidActionObjectCombinations()))
        return list(self._valid_cache)

    def project_action(self, action: str) -> str | None:
        action = _normalise(action)
        return action or None

    # -- extras -----------------------------------------------------------------------------------
    def gold_actions(self) -> list[str]:
        """The simulator's winning action sequence for the current task (needs `generate_gold_path=True`)."""
        if not self.generate_gold_path or self._sw is None:
            raise RuntimeError("No gold path: create the env with generate_gold_path=True, then reset() a task.")
        return list(self._sw.get_gold_action_sequence())

    @property
    def simulator(self):
        """The underlying `scienceworld.ScienceWorldEnv` (None before the first reset)."""
        return self._sw


def _is_bridge_error(e: BaseException) -> bool:
    try:
        from py4j.protocol import Py4JError
    except ImportError:  # pragma: no cover - py4j comes with scienceworld
        Py4JError = ()  # noqa: N806
    return isinstance(e, (Py4JError, ConnectionError, EOFError, BrokenPipeError, OSError))


class ScienceWorldFactory(EnvFactory):
    """ScienceWorld task instances and live simulators.

    Args:
        task_names: the seen task types (train and valid_seen). Default: every task not held out.
        held_out_tasks: the unseen task types played only in valid_unseen (OOD). Default:
            `DEFAULT_HELD_OUT_TASKS`. Must not overlap `task_names`.
        split_protocol: which variations the validation splits use: "test" (default, ScienceWorld's test
            variations) or "dev".
        max_variations_per_task: cap the variations per task type in every split (first ones, sorted).
        simplification: ScienceWorld simplification string; "easy" (paper) = teleport, open doors/containers,
            self-watering pots, no electrical actions (except where the task needs them).
        env_step_limit: the simulator's own move limit (paper: 100); the rollout's turn limit is separate.
        jvm_max_heap: JVM heap bound (`-Xmx`), "512m" by default; None leaves the JVM's default (~880 MB RSS).
        java_tool_options: full JAVA_TOOL_OPTIONS for the simulator's JVM; overrides `jvm_max_heap`.
        with_valid_actions: offer the valid-action list (`admissible_actions()`); False returns None.
        valid_actions_format: "templates" (default): the action templates ("open OBJ", ...) plus one entry
            listing the objects OBJ can be, a short prompt (as RLVMR's ScienceWorld prompt); "combinations":
            every valid action-object combination (~100 in a hallway, ~1,300 / 20k characters in a kitchen,
            which overflows a 2k-token prompt).
        generate_gold_path: let envs compute the simulator's gold action sequence (slower loads; tests/demos).
    """

    name = "scienceworld"
    prompt_header = SCIENCEWORLD_PROMPT_HEADER
    thread_safe = False  # one JVM per env, driven over py4j: worker processes give real parallelism

    def __init__(
        self,
        task_names: list[str] | tuple[str, ...] | None = None,
        held_out_tasks: list[str] | tuple[str, ...] | None = DEFAULT_HELD_OUT_TASKS,
        split_protocol: str = "test",
        max_variations_per_task: int | None = None,
        simplification: str = "easy",
        env_step_limit: int = 100,
        jvm_max_heap: str | None = "512m",
        java_tool_options: str | None = None,
        with_valid_actions: bool = True,
        generate_gold_path: bool = False,
        valid_actions_format: str = "templates",
    ):
        _import_scienceworld()
        if valid_actions_format not in ("combinations", "templates"):
            raise ValueError(f"valid_actions_format={valid_actions_format!r}: use 'combinations' or 'templates'.")
        if split_protocol not in ("test", "dev"):
            raise ValueError(f"split_protocol={split_protocol!r}: use 'test' (default) or 'dev'.")
        if max_variations_per_task is not None and max_variations_per_task < 1:
            raise ValueError(f"max_variations_per_task={max_variations_per_task}: use a positive int or None.")
        self.held_out_tasks = _canonical(held_out_tasks or (), "held_out_tasks")
        if task_names is None:
            self.task_names = [t for t in all_task_names() if t not in self.held_out_tasks]
        else:
            self.task_names = _canonical(task_names, "task_names")
            overlap = sorted(set(self.task_names) & set(self.held_out_tasks))
            if overlap:
                raise ValueError(
                    f"Tasks {overlap} are both trained (task_names) and held out (held_out_tasks). Remove them from "
                    "one list, e.g. pass held_out_tasks=() to train on every task."
                )
        if not self.task_names:
            raise ValueError("No seen ScienceWorld task types left: pass task_names or shorten held_out_tasks.")
        self.split_protocol = split_protocol
        self.max_variations_per_task = max_variations_per_task
        self.simplification = simplification
        self.env_step_limit = env_step_limit
        self.java_tool_options = _java_tool_options(jvm_max_heap, java_tool_options)
        self.with_valid_actions = with_valid_actions
        self.generate_gold_path = generate_gold_path
        self.valid_actions_format = valid_actions_format
        self._expert: ScienceWorldTextEnv | None = None  # a JVM with gold paths on, started by the first solve
        self._gold: dict[TaskSpec, list[str]] = {}
        self._content: dict[TaskSpec, str] = {}  # task -> content_key

    def __getstate__(self):  # worker processes get the factory, not its expert's JVM (py4j cannot be pickled)
        return {**self.__dict__, "_expert": None}

    def make(self) -> ScienceWorldTextEnv:
        return ScienceWorldTextEnv(
            simplification=self.simplification,
            env_step_limit=self.env_step_limit,
            java_tool_options=self.java_tool_options,
            with_valid_actions=self.with_valid_actions,
            generate_gold_path=self.generate_gold_path,
            valid_actions_format=self.valid_actions_format,
        )

    def tasks(self, split: str = "train") -> list[TaskSpec]:
        """Task instances of `split`, interleaved across task types (so a prefix is balanced)."""
        if split == "train":
            names, which = self.task_names, "train"
        elif split == "valid_seen":
            names, which = self.task_names, self.split_protocol
        elif split == "valid_unseen":
            names, which = self.held_out_tasks, self.split_protocol
            if not names:
                raise ValueError("valid_unseen is empty: this factory holds out no task types (held_out_tasks).")
        else:
            raise ValueError(f"Unknown ScienceWorld split {split!r}; use 'train', 'valid_seen' or 'valid_unseen'.")
        variations = task_variations(names, self.java_tool_options)
        per_task = []
        for name in names:
            vs = variations[name][which]
            if self.max_variations_per_task is not None:
                vs = vs[: self.max_variations_per_task]
            per_task.append([TaskSpec(env="scienceworld", task=name, variation=v, seed=0) for v in vs])
        out = []
        for i in range(max((len(p) for p in per_task), default=0)):  # round-robin over task types
            out += [p[i] for p in per_task if i < len(p)]
        return out

    def task_types(self) -> list[str]:
        return sorted(set(self.task_names) | set(self.held_out_tasks))

    def task_type(self, task: TaskSpec) -> str:
        return task.task

    def solve(self, task: TaskSpec, prefix: Sequence[str] = ()) -> list[str]:
        """The simulator's gold path after `prefix` (the expert of warm starts), which must itself be a start of the
        gold path: ScienceWorld plans only from the start state, so noisy demonstrations are not available."""
        if task not in self._gold:
            expert = self._expert_env()
            expert.reset(task)
            gold, won = [], False
            for action in expert.gold_actions():
                gold.append(action)
                _, _, terminated, truncated, info = expert.step(action)
                # the sim's list can go on after the win (e.g. a trailing 'wait1'): a plan ends with its game
                if terminated or truncated:
                    won = info["won"]
                    break
            if not won:
                raise ValueError(f"ScienceWorld's gold path does not win {task.key()}: {gold!r}.")
            self._gold[task] = gold
        gold = self._gold[task]
        if gold[: len(prefix)] != list(prefix):
            raise ValueError(
                f"ScienceWorld's expert is the simulator's gold path; {list(prefix)!r} leaves it (gold: {gold!r}). "
                "Warm-start ScienceWorld with the gold path alone (warmstart_noisy_steps: 0)."
            )
        return list(gold[len(prefix) :])

    def _expert_env(self) -> ScienceWorldTextEnv:
        if self._expert is None:
            self._expert = ScienceWorldTextEnv(
                self.simplification, self.env_step_limit, self.java_tool_options, False, True
            )
        return self._expert

    def content_key(self, task: TaskSpec) -> str:
        """What makes two variations the same game: the task, its goal, the first observation (the text `reset`
        returns, as a bag of words: the simulator lists a room's objects in no fixed order) and the simulator's whole
        object tree at the start (`_canonical_tree`: every room, object, substance and its properties, without object
        ids). The gold path is no part of it: the simulator draws it anew at some loads (chemistry-mix's differs
        between two loads of one variation) and generating it costs 0.3-5 s a load; the tree is the state it is
        planned from. Cached per task; loads in the expert's JVM without a gold path (~0.1 s a task)."""
        if task not in self._content:
            expert = self._expert_env()
            expert.generate_gold_path = False  # a plain load: the key does not need the (slow) gold path
            try:
                obs, info = expert.reset(task)
                tree = _canonical_tree(expert.simulator.getObjectTree())
            finally:
                expert.generate_gold_path = True  # `solve` loads again, with its gold path
            # the room text lists its objects in no fixed order (two loads of one variation differ): its words, sorted
            content = {"task": task.task, "goal": info["goal"], "observation": sorted(obs.split()), "world": tree}
            self._content[task] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
        return self._content[task]

    def close(self) -> None:
        if self._expert is not None:
            self._expert.close()
            self._expert = None
