"""ALFWorld (Shridhar et al., 2021), the text-only TextWorld version, behind the `TextEnv` protocol.

Each task instance is one game folder of the ALFWorld data (`$ALFWORLD_DATA/json_2.1.1/<split>/...`),
played by TextWorld's PDDL engine with the wrappers `alfworld` itself uses in `AlfredTWEnv`
(`AlfredDemangler` turns `Apple_bar__plus_00_dot_10...` into "apple 1", `AlfredInfos`, and optionally
`AlfredExpert`). We load one game per `reset(task)` instead of `AlfredTWEnv`'s gym wrapper, which
cycles through its whole game list and cannot be pointed at a given game.

Splits: train = `json_2.1.1/train`; valid_seen (IID) = `json_2.1.1/valid_seen`; valid_unseen (OOD) =
`json_2.1.1/valid_unseen` (rooms never seen in training). Reward 10 on a win, 0 otherwise. `content_key(task)` names
the game a folder holds (first observation, goal, the expert's plan), so held-out splits can be checked to be unseen by
content, not only by folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Sequence
from typing import Any

from ..protocol import EnvFactory, TaskSpec, TextEnv

#: ALFWorld's six task types (alfworld.agents.environment.alfred_tw_env.TASK_TYPES).
TASK_TYPES: tuple[str, ...] = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
SPLIT_DIRS = {"train": "train", "valid_seen": "valid_seen", "valid_unseen": "valid_unseen"}

ALFWORLD_PROMPT_HEADER = (
    "You are an expert agent operating in the ALFRED Embodied Environment, a simulated household. You are a "
    "robot in a room with receptacles (countertops, cabinets, drawers, fridge, microwave, sinkbasin, ...) that "
    "hold objects. You act with text commands such as 'go to countertop 1', 'open fridge 1', 'take apple 1 "
    "from countertop 1', 'move apple 1 to fridge 1', 'heat apple 1 with microwave 1', 'cool ... with fridge 1', "
    "'clean ... with sinkbasin 1', 'use desklamp 1', 'examine ...', 'inventory' and 'look'. Choose one of the "
    "admissible actions; any other command does nothing."
)

_SOLVABLE_RE = re.compile(r'"solvable"\s*:\s*(true|false)')
_BANNER = "-= Welcome to TextWorld, ALFRED! =-"
_GAMES_CACHE: dict[tuple[str, str], list[str]] = {}  # (data root, split) -> game folders relative to the root
_GAMES_LOCK = threading.Lock()


def _import_textworld():
    try:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
    except ImportError as e:
        raise ImportError(
            "The ALFWorld environment needs the alfworld package (it pulls textworld): pip install 'epo-trl[alfworld]', "
            "then download the games with `alfworld-download` and set ALFWORLD_DATA."
        ) from e
    return textworld, AlfredDemangler, AlfredInfos, AlfredExpert


def default_data_path() -> str:
    """`$ALFWORLD_DATA`, else `~/.cache/alfworld` (where `alfworld-download` writes by default)."""
    return os.path.expanduser(os.environ.get("ALFWORLD_DATA") or os.path.join("~", ".cache", "alfworld"))


def task_type_of(game_folder: str) -> str:
    """The task type of a game folder (`.../<task_type>-<obj>-<mrecep>-<recep>-<scene>/trial_...`)."""
    parts = [p for p in game_folder.replace("\\", "/").split("/") if p]
    for part in reversed(parts):
        prefix = part.split("-", 1)[0]
        if prefix in TASK_TYPES:
            return prefix
    traj = os.path.join(game_folder, "traj_data.json")
    if os.path.isfile(traj):
        with open(traj) as f:
            return json.load(f)["task_type"]
    raise ValueError(f"Cannot tell the ALFWorld task type of {game_folder!r} (no '<task_type>-...' folder).")


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _scan_games(root: str, split: str) -> list[str]:
    """Playable games of a split, with AlfredTWEnv's filters (no movable/sliced, known type, solvable)."""
    split_dir = os.path.join(root, "json_2.1.1", SPLIT_DIRS[split])
    games = []
    for folder, _dirs, files in os.walk(split_dir):
        if "traj_data.json" not in files or "game.tw-pddl" not in files:
            continue
        if "movable" in folder or "Sliced" in folder:  # not supported by the text engine (as in AlfredTWEnv)
            continue
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        try:
            if task_type_of(rel) not in TASK_TYPES:
                continue
        except ValueError:
            continue
        with open(os.path.join(folder, "game.tw-pddl")) as f:
            solvable = _SOLVABLE_RE.search(f.read())  # a regex, not json.load: ~3.5k files of ~50 KB each
        if solvable is None or solvable.group(1) != "true":
            continue
        games.append(rel)
    return sorted(games)


class ALFWorldTextEnv(TextEnv):
    """One live ALFWorld game engine (in-process TextWorld). Not thread-safe: run envs in worker processes."""

    def __init__(self, data_path: str, expert: str | None = None, drop_help: bool = True):
        self.data_path = data_path
        self.expert = expert
        self.drop_help = drop_help
        self._textworld, self._Demangler, self._Infos, self._Expert = _import_textworld()
        self._env = None
        self._game: str | None = None
        self._state = None
        self._done = True
        self._closed = False

    def _load(self, game_file: str) -> None:
        if self._env is not None and self._game == game_file:
            return  # same game again (a GRPO group on one worker): reset() replays it from the start
        if self._env is not None:
            self._env.close()
        infos = self._textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        wrappers = [self._Demangler(shuffle=False), self._Infos]
        if self.expert is not None:
            wrappers.append(self._Expert(expert_type=self.expert))
            infos.extras.append("expert_plan")
        self._env = self._textworld.start(game_file, infos, wrappers=wrappers)
        self._game = game_file

    def reset(self, task: TaskSpec) -> tuple[str, dict[str, Any]]:
        if self._closed:
            raise RuntimeError("This ALFWorld env was closed; create a new one with factory.make().")
        if task.env != "alfworld":
            raise ValueError(f"ALFWorld cannot play a task of env {task.env!r}: {task.key()}.")
        game_file = os.path.join(self.data_path, task.task, "game.tw-pddl")
        if not os.path.isfile(game_file):
            raise FileNotFoundError(
                f"ALFWorld game {task.task!r} not found: no file {game_file}. The task list and the data folder "
                "disagree; build tasks with the same data_path / ALFWORLD_DATA that the envs use."
            )
        self._load(game_file)
        state = self._env.reset()
        self._state = state
        self._done = False
        obs = state.feedback.replace(_BANNER, "").strip()
        goal = ""
        marker = "Your task is to:"
        if marker in obs:
            goal = obs.split(marker, 1)[1].strip()
        info = {"goal": goal, "won": False, "task_type": task_type_of(task.task), "gamefile": game_file}
        if self.expert is not None:
            info["expert_plan"] = list(state.get("extra.expert_plan") or [])
        return obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Terminated: the game is won or lost; never truncated (the engine here has no move limit: the rollout's
        `max_turns` cuts episodes off)."""
        if self._state is None or self._done:
            raise RuntimeError("step() called on a finished (or never started) ALFWorld episode; call reset().")
        state, _score, done = self._env.step(action)
        self._state = state
        won = bool(state["won"])
        self._done = bool(done) or won
        info: dict[str, Any] = {"won": won}
        if self.expert is not None:
            info["expert_plan"] = list(state.get("extra.expert_plan") or [])
        # An invalid command leaves the game unchanged and answers "Nothing happens.": a normal observation.
        return state.feedback.strip(), (10.0 if won else 0.0), self._done, False, info

    def admissible_actions(self) -> list[str] | None:
        if self._state is None:
            return None
        commands = list(self._state["admissible_commands"] or [])
        if self.drop_help:  # 'help' lists the command grammar; the paper's prompts leave it out
            commands = [c for c in commands if c != "help"]
        return commands

    def project_action(self, action: str) -> str | None:
        cleaned = _normalise(action)
        if not cleaned:
            return None
        for command in self.admissible_actions() or []:
            if _normalise(command) == cleaned:
                return command
        return cleaned  # not admissible: the engine answers "Nothing happens."

    def expert_plan(self) -> list[str]:
        """The built-in expert's next command(s) in the current state (needs `expert=` on the factory)."""
        if self.expert is None or self._state is None:
            raise RuntimeError("No expert: create the factory with expert='handcoded' or 'planner', then reset().")
        return list(self._state.get("extra.expert_plan") or [])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._env is not None:
            self._env.close()
            self._env = None


class ALFWorldFactory(EnvFactory):
    """ALFWorld task instances (one per game folder) and live game engines.

    Args:
        data_path: the ALFWorld data root holding `json_2.1.1/`. Default: `$ALFWORLD_DATA`, else
            `~/.cache/alfworld` (alfworld-download's default).
        task_types: keep only these task types (default: all six, `TASK_TYPES`).
        expert: attach alfworld's built-in expert ("handcoded": next step from hand-written policies;
            "planner": a fast-downward plan). Off by default (it slows steps); for tests, demos and SFT data.
        max_games: cap the games per split (the first ones, sorted by path).
        sample_games: play the four offline sample games (`games.write_sample_games`, written once into
            `data_path`, default `~/.cache/epo-trl/alfworld-sample`) instead of downloaded ones.
    """

    name = "alfworld"
    prompt_header = ALFWORLD_PROMPT_HEADER
    # TextWorld parses commands with one module-level parser: two threads stepping games at once corrupt it
    # ("IndexError: pop from empty list"). Envs run in worker processes (one parser each), which also scales.
    thread_safe = False
    worker_imports = ("textworld", "alfworld.agents.environment.alfred_tw_env")

    def __init__(
        self,
        data_path: str | os.PathLike | None = None,
        task_types: list[str] | tuple[str, ...] | None = None,
        expert: str | None = None,
        max_games: int | None = None,
        sample_games: bool = False,
    ):
        _import_textworld()
        if sample_games:
            from .games import write_sample_games

            data_path = data_path or os.path.join("~", ".cache", "epo-trl", "alfworld-sample")
            write_sample_games(os.path.expanduser(str(data_path)))
        self.data_path = os.path.abspath(os.path.expanduser(str(data_path))) if data_path else default_data_path()
        if task_types is None:
            self.selected_types = list(TASK_TYPES)
        else:
            unknown = sorted(set(task_types) - set(TASK_TYPES))
            if unknown:
                raise ValueError(f"Unknown ALFWorld task types {unknown}. Known: {list(TASK_TYPES)}.")
            self.selected_types = [t for t in TASK_TYPES if t in set(task_types)]
        if expert not in (None, "handcoded", "planner"):
            raise ValueError(f"expert={expert!r}: use None, 'handcoded' or 'planner'.")
        self.expert = expert
        self.max_games = max_games
        self._expert_env: ALFWorldTextEnv | None = None  # the game `solve` plans in, started by its first call
        self._content: dict[TaskSpec, str] = {}  # task -> content_key

    def __getstate__(self):  # worker processes get the factory, not its expert's live game
        return {**self.__dict__, "_expert_env": None}

    def _check_data(self) -> None:
        games_dir = os.path.join(self.data_path, "json_2.1.1")
        if not os.path.isdir(games_dir):
            raise FileNotFoundError(
                f"ALFWorld games not found: looked for {games_dir}. Download them once with `alfworld-download` "
                "(it writes to ~/.cache/alfworld by default), then set ALFWORLD_DATA to the folder that holds "
                "json_2.1.1/ or pass data_path=. For a small offline sample, use "
                "epo_trl.envs.alfworld.games.write_sample_games(folder), or env_kwargs {sample_games: true}."
            )

    def make(self) -> ALFWorldTextEnv:
        self._check_data()
        return ALFWorldTextEnv(self.data_path, expert=self.expert)

    def tasks(self, split: str = "train") -> list[TaskSpec]:
        if split not in SPLIT_DIRS:
            raise ValueError(f"Unknown ALFWorld split {split!r}; use 'train', 'valid_seen' or 'valid_unseen'.")
        self._check_data()
        with _GAMES_LOCK:
            key = (self.data_path, split)
            if key not in _GAMES_CACHE:
                _GAMES_CACHE[key] = _scan_games(self.data_path, split)
            games = _GAMES_CACHE[key]
        games = [g for g in games if task_type_of(g) in self.selected_types]
        if self.max_games is not None:
            games = games[: self.max_games]
        return [TaskSpec(env="alfworld", task=g, variation=0, seed=0) for g in games]

    def task_types(self) -> list[str]:
        return list(self.selected_types)

    def task_type(self, task: TaskSpec) -> str:
        return task_type_of(task.task)

    def solve(self, task: TaskSpec, prefix: Sequence[str] = (), max_moves: int = 100) -> list[str]:
        """The built-in expert's commands (`expert`, "handcoded" when unset) from the state `prefix` leads to until
        the game is won: it re-plans from any state, so noisy warm starts work. Empty when `prefix` already ends
        the game; ValueError when the expert does not win within `max_moves`."""
        env = self._expert()
        env.reset(task)
        for command in prefix:
            _, _, terminated, truncated, _ = env.step(command)
            if terminated or truncated:
                return []
        plan, won = _play_expert(env, max_moves)
        if not won:
            raise ValueError(
                f"ALFWorld's {env.expert} expert did not win {task.task!r} within {max_moves} moves after "
                f"{list(prefix)!r}; this game cannot be warm-started (try expert='planner')."
            )
        return plan

    def _expert(self) -> ALFWorldTextEnv:
        if self._expert_env is None:
            self._check_data()
            self._expert_env = ALFWorldTextEnv(self.data_path, expert=self.expert or "handcoded")
        return self._expert_env

    def content_key(self, task: TaskSpec, max_moves: int = 100) -> str:
        """What makes two game folders the same game: the task type, the first observation (the room's receptacles,
        as `reset` returns it), the goal, and the expert's plan from the start (`solve`'s expert, which finds the
        objects wherever they lie; a plan that does not win within `max_moves` counts as played, with won=False).
        Cached per task; plays the expert in the factory's expert game (tens of moves a game)."""
        if task not in self._content:
            env = self._expert()
            obs, info = env.reset(task)
            plan, won = _play_expert(env, max_moves)
            content: dict[str, Any] = {"type": task_type_of(task.task), "observation": obs, "goal": info["goal"]}
            content.update(plan=plan, won=won)
            self._content[task] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
        return self._content[task]

    def close(self) -> None:
        if self._expert_env is not None:
            self._expert_env.close()
            self._expert_env = None


def _play_expert(env: ALFWorldTextEnv, max_moves: int) -> tuple[list[str], bool]:
    """Play the built-in expert's next command until the game ends or `max_moves`; (commands played, won)."""
    plan: list[str] = []
    done = won = False
    while not done and len(plan) < max_moves:
        next_commands = env.expert_plan()
        if not next_commands:
            break
        plan.append(next_commands[0])
        _, _, terminated, truncated, info = env.step(plan[-1])
        done, won = terminated or truncated, info["won"]
    return plan, won
