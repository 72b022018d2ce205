"""TextWorldExpress (Jansen & Côté, 2022) behind the `TextEnv` protocol: fast text games in one JVM per env.

Wraps the `textworld-express` package (a Scala re-implementation of TextWorld-style games, driven through py4j;
~2,200 random steps/s here). What this adapter adds:

- task instances from the package's own seeded folds: train = the train fold, valid_seen = dev, valid_unseen = test
  (for `twc`, the test fold holds unseen objects; for the other games the folds are disjoint seeds of one
  distribution); held-out splits skip seeds whose game (`content_key`) occurs in train or earlier in the split:
  disjoint seeds can build the same game (small Coin Collector maps do);
- won = the game's `tasksuccess`; `taskfailure` (e.g. eating a wrong ingredient in CookingWorld) ends it as a loss;
- actions are matched against the game's `validActions` (case and spacing normalised); anything else goes to the
  game as typed, which answers it without a state change (as ALFWorld's engine does);
- the expert is the game's gold path (`generateGoldPath=True`), from the start of an episode or from any prefix of it;
- `content_key(task)` names the game a seed builds (first observation, goal, the world as a fixed walk explores it),
  so held-out folds are checked to be unseen by content, not only by seed;
- a crashed JVM is reported by `step` (`TextWorldExpressCrashedError`) and restarted by the next `reset`;
- the JVM's py4j gateway requires an auth token (`jvm_gateway.require_auth`, applied in `_import_twx`): without it
  any local user could connect to its port and run commands as the trainer's user.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from .jvm_gateway import check_auth, require_auth
from .protocol import EnvFactory, TaskSpec, TextEnv, unseen_tasks, words_of

GAMES = ("coin", "cookingworld", "twc", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder")
FOLDS = {"train": "train", "valid_seen": "dev", "valid_unseen": "test"}

PROMPT_HEADERS = {
    "coin": "You are an expert agent playing Coin Collector, a text game: explore the rooms (open doors when they "
    "are closed) to find the coin, then take it.",
    "cookingworld": "You are an expert agent playing CookingWorld, a text game: find the recipe, gather and prepare "
    "its ingredients (slice, dice, chop, fry, roast, grill) and prepare the meal, then eat it.",
    "twc": "You are an expert agent playing TextWorld Commonsense, a text game: put misplaced items in the places "
    "where they belong in a house.",
}
DEFAULT_HEADER = "You are an expert agent playing a TextWorldExpress text game."


class TextWorldExpressCrashedError(RuntimeError):
    """The game's JVM died or its py4j bridge failed during a step; the next `reset` restarts it."""


def _import_twx():
    if shutil.which("java") is None:
        raise RuntimeError(
            "TextWorldExpress runs in a Java virtual machine, but no `java` executable is on PATH. Install a Java "
            "runtime >= 11 (Debian/Ubuntu: `apt-get install default-jre-headless`) and check `java -version`."
        )
    try:
        from textworld_express import TextWorldExpressEnv
    except ImportError as e:
        raise ImportError(
            "The TextWorldExpress environment needs the textworld-express package: "
            "pip install 'epo-trl[textworld-express]'."
        ) from e
    require_auth(sys.modules[TextWorldExpressEnv.__module__])  # its JVM gateway takes a token (jvm_gateway.py)
    return TextWorldExpressEnv


def _start_twx(env_step_limit: int):
    """One TextWorldExpress server (one JVM), checked to hold an authenticated gateway."""
    twx = _import_twx()(envStepLimit=env_step_limit)
    check_auth(twx)
    return twx


_BRIEF_KEEP = ("north", "south", "east", "west", "coin")


def brief_room(text: str) -> str:
    """Coin Collector's text without the furniture: the first sentence ("You are in the kitchen.") and those that
    name a direction (exits, doors) or the coin. The furniture is ~3/4 of a room's text and never matters there."""
    sentences = [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]
    return " ".join(s for i, s in enumerate(sentences) if i == 0 or any(w in s.lower() for w in _BRIEF_KEEP))


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
_EXPLORE_STEPS = 1000  # a bound on `_explore_map`'s steps (11 rooms with doors take ~100)


def _room(obs: str) -> str | None:
    """The room an observation stands in ("You are in the kitchen. ..." -> "kitchen"), None when it is no room."""
    m = re.match(r"\s*You are in the ([^.]+)\.", obs)
    return m.group(1) if m else None


def _explore_map(twx, obs: str, valid: Sequence[str]) -> list[tuple[str, str]]:
    """Walk the whole map depth-first from the start room, directions in sorted order, opening closed doors, and in
    each room open its containers and read what can be read; return the (command, observation) transcript: the same
    game gives the same transcript, whatever the seed. `twx` is a server just reset (its first observation `obs`,
    valid actions `valid`); it is left wherever the walk ends. The game's step limit is not applied (the server does
    not enforce it): the walk takes nothing and cooks nothing, so it cannot win or lose."""
    transcript: list[tuple[str, str]] = []
    seen = {_room(obs)}

    def step(command: str) -> tuple[str, list[str]]:
        out, _, _, infos = twx.step(command)
        transcript.append((command, out))
        return out, list(infos["validActions"])

    def visit(valid: Sequence[str]) -> None:
        for command in sorted(a for a in valid if a.startswith(("open ", "read ")) and not a.startswith("open door")):
            step(command)  # what the room hides: the containers' contents (the fridge's), what is written (a recipe)
        directions = sorted({a.rsplit(" ", 1)[-1] for a in valid if a.startswith(("move ", "open door to "))})
        for d in directions:
            if len(transcript) >= _EXPLORE_STEPS or d not in _OPPOSITE:
                return
            if f"open door to {d}" in valid:
                step(f"open door to {d}")
            out, here = step(f"move {d}")
            room = _room(out)
            if room is None:  # did not move (a locked way, an unknown command)
                continue
            if room not in seen:
                seen.add(room)
                visit(here)
            step(f"move {_OPPOSITE[d]}")

    visit(valid)
    return transcript


def _digest(content: Any) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _fold_and_seed(task: TaskSpec) -> tuple[str, int]:
    game, _, fold = task.task.partition("/")
    if game not in GAMES or fold not in FOLDS.values():
        raise ValueError(f"Not a TextWorldExpress task: {task.task!r}; expected '<game>/<train|dev|test>'.")
    return fold, task.variation


class TextWorldExpressTextEnv(TextEnv):
    """One live game server (one JVM). Not thread-safe; the rollout runs these in worker processes."""

    def __init__(
        self, game: str, game_params: str, env_step_limit: int, gold_path: bool = False, brief_rooms: bool = False
    ):
        self.game, self.game_params, self.env_step_limit, self.gold_path = game, game_params, env_step_limit, gold_path
        self._text = brief_room if brief_rooms else str
        self._twx = None  # started by the first reset, restarted after a crash
        self._valid: list[str] = []
        self._done = True

    def _server(self):
        if self._twx is None:
            self._twx = _start_twx(self.env_step_limit)
        return self._twx

    def reset(self, task: TaskSpec) -> tuple[str, dict[str, Any]]:
        fold, seed = _fold_and_seed(task)
        try:
            obs, infos = self._server().reset(
                seed=seed, gameFold=fold, gameName=self.game, gameParams=self.game_params,
                generateGoldPath=self.gold_path,
            )  # fmt: skip
        except Exception:
            self._drop_server()
            raise
        self._valid, self._done = list(infos["validActions"]), False
        return self._text(obs), {"goal": infos["taskDescription"]}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Terminated: the game's success or failure (or full score); truncated: its move limit passed first."""
        if self._done:
            raise RuntimeError("step() after the episode ended; call reset(task) first.")
        try:
            obs, reward, done, infos = self._twx.step(action)
        except Exception as e:
            self._drop_server()
            raise TextWorldExpressCrashedError(f"TextWorldExpress failed on {action!r}: {e}") from e
        won, lost = bool(infos["tasksuccess"]), bool(infos["taskfailure"])
        self._done = bool(done or won or lost)
        # the game's `done` also covers its move limit (numMoves > envStepLimit): ending that way alone is a truncation
        truncated = self._done and not won and not lost and float(infos["score"]) < 1.0
        self._valid = list(infos["validActions"])
        info = {"won": won, "score": float(infos["score"])}
        return self._text(obs), float(reward), self._done and not truncated, truncated, info

    def admissible_actions(self) -> list[str] | None:
        return list(self._valid)

    def project_action(self, action: str) -> str | None:
        cleaned = _normalise(action)
        if not cleaned:
            return None
        # Not a valid action: the game answers it (gold paths themselves hold a few, e.g. opening an open door).
        return next((a for a in self._valid if _normalise(a) == cleaned), cleaned)

    def gold_actions(self) -> list[str]:
        """The game's gold action sequence of the current episode (needs `gold_path=True`)."""
        return list(self._twx.getGoldActionSequence())

    def _drop_server(self) -> None:
        twx, self._twx, self._done = self._twx, None, True
        if twx is not None:
            try:
                twx.close()
            except Exception:  # noqa: BLE001 - a dead JVM cannot be closed cleanly; it is dropped either way
                pass

    def close(self) -> None:
        self._drop_server()


class TextWorldExpressFactory(EnvFactory):
    """TextWorldExpress games behind the protocol.

    Args:
        game: one of `GAMES` (coin, cookingworld, twc, ...).
        game_params: the package's generation string, e.g. "numLocations=11,includeDoors=1" (Coin Collector) or
            "numLocations=3,numIngredients=2,numDistractorItems=0" (CookingWorld); "" = the game's defaults.
        num_train / num_valid: task instances (seeds of the fold) per split.
        env_step_limit: the game's own move limit (the rollout's `max_turns` is usually lower).
        brief_rooms: Coin Collector only: drop the furniture from the room text (`brief_room`), ~600 -> ~150
            characters a room, for CPU-sized runs; the game is unchanged (actions, exits, the coin).
    """

    name = "textworld_express"
    thread_safe = False  # one JVM per env behind py4j: worker processes
    worker_imports = ("textworld_express",)

    def __init__(
        self,
        game: str = "coin",
        game_params: str = "numLocations=5,includeDoors=0",
        num_train: int = 256,
        num_valid: int = 64,
        env_step_limit: int = 100,
        brief_rooms: bool = False,
    ):
        if game not in GAMES:
            raise ValueError(f"Unknown TextWorldExpress game {game!r}; use one of {list(GAMES)}.")
        if brief_rooms and game != "coin":
            raise ValueError(
                f"brief_rooms drops Coin Collector's furniture sentences; in {game!r} the objects matter. Remove "
                "brief_rooms or use game='coin'."
            )
        for label, value in (("num_train", num_train), ("num_valid", num_valid), ("env_step_limit", env_step_limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"textworld_express {label}={value!r} must be an integer >= 1.")
        self.game, self.game_params = game, game_params
        self.num_train, self.num_valid, self.env_step_limit = num_train, num_valid, env_step_limit
        self.brief_rooms = brief_rooms
        self.prompt_header = PROMPT_HEADERS.get(game, DEFAULT_HEADER)
        self._seeds: dict[str, list[int]] = {}
        self._expert: TextWorldExpressTextEnv | None = None
        self._gold: dict[TaskSpec, list[str]] = {}
        self._content: dict[TaskSpec, str] = {}  # task -> content_key
        self._held_out: dict[str, list[TaskSpec]] = {}  # split -> its unseen games (`_unseen`)

    def make(self) -> TextWorldExpressTextEnv:
        _import_twx()  # fail at make, with the install hint, not at the first reset
        return TextWorldExpressTextEnv(self.game, self.game_params, self.env_step_limit, brief_rooms=self.brief_rooms)

    def tasks(self, split: str = "train") -> list[TaskSpec]:
        if split not in FOLDS:
            raise ValueError(f"Unknown split {split!r}; TextWorldExpress has {list(FOLDS)}.")
        fold = FOLDS[split]
        if fold not in self._seeds:  # the fold's seeds, from the package (one short-lived JVM)
            server = _start_twx(self.env_step_limit)
            try:
                server.load(self.game, self.game_params)
                getter = {"train": server.getValidSeedsTrain, "dev": server.getValidSeedsDev,
                          "test": server.getValidSeedsTest}[fold]  # fmt: skip
                self._seeds[fold] = sorted(int(s) for s in getter())
            finally:
                server.close()
        specs = [TaskSpec(self.name, f"{self.game}/{fold}", seed) for seed in self._seeds[fold]]
        if split == "train":
            return specs[: self.num_train]
        if split not in self._held_out:
            self._held_out[split] = self._unseen(split, specs)
        return list(self._held_out[split])

    def _unseen(self, split: str, candidates: list[TaskSpec]) -> list[TaskSpec]:
        """The first `num_valid` seeds of a held-out fold whose game (`content_key`) is not a `train` game nor one
        taken before in the split. The folds are disjoint seeds, not disjoint games: Coin Collector with 5 rooms and
        no doors repeats train games in its folds (19 of the first 64 dev seeds build one of the first 256 train
        games; of 1,000 dev / 1,000 test seeds, 147 / 299 build one of 1,000 train games), which would make the
        held-out splits partly seen. Costs a content key per train task and candidate
        (~10-20 ms each, in the expert's JVM; a JVM this call starts, it closes), once per factory."""
        started_expert = self._expert is None
        try:
            train = {self.content_key(t) for t in self.tasks("train")}
            out = unseen_tasks(candidates, self.num_valid, self.content_key, train)
        finally:
            if started_expert:
                self.close()
        if len(out) < min(self.num_valid, len(candidates)):
            raise ValueError(
                f"TextWorldExpress {self.game!r} ({self.game_params!r}) split {split!r}: only {len(out)} of "
                f"num_valid={self.num_valid} games of the {len(candidates)}-seed fold are distinct and unseen in the "
                f"{self.num_train} train tasks. Use a larger game (game_params), or fewer num_train / num_valid."
            )
        return out

    def task_type(self, task: TaskSpec) -> str:
        return task.task.partition("/")[0]

    def task_types(self) -> list[str]:
        return [self.game]

    def solve(self, task: TaskSpec, prefix: Sequence[str] = ()) -> list[str]:
        """The gold path's remaining commands after `prefix`, which must itself be a start of the gold path (the
        game gives no plan from other states)."""
        if task not in self._gold:  # the game draws a (valid) gold path anew at every reset: keep the first
            expert = self._expert_env()
            expert.reset(task)
            self._gold[task] = expert.gold_actions()
        gold = self._gold[task]
        if gold[: len(prefix)] != list(prefix):
            raise ValueError(
                f"TextWorldExpress's expert is the game's gold path; {list(prefix)!r} leaves it (gold: {gold!r}). "
                "Warm starts with noise need an expert that re-plans, which this game does not offer."
            )
        return list(gold[len(prefix) :])

    def _expert_env(self) -> TextWorldExpressTextEnv:
        if self._expert is None:
            self._expert = TextWorldExpressTextEnv(self.game, self.game_params, self.env_step_limit, True)
        return self._expert

    def content_key(self, task: TaskSpec) -> str:
        """What makes two seeds the same game: the first observation, the goal and the world (`_explore_map`'s
        transcript: every room's text, the way between rooms, what the containers hold and the recipe says). The gold
        path is no part of it: the game draws it anew at every reset (Coin Collector's is a random walk; TextWorld
        Commonsense picks one of the places an item belongs), so it would tell one game apart from itself; the world
        is what it is planned in. Texts are those the env returns (`brief_rooms` applied). Cached per task; the walk
        runs in the expert's JVM (~10-20 ms a game)."""
        if task not in self._content:
            expert = self._expert_env()
            obs, info = expert.reset(task)
            twx, valid, text = expert._twx, expert.admissible_actions(), brief_room if self.brief_rooms else str
            walk = [(command, text(out)) for command, out in _explore_map(twx, obs, valid)]
            expert._done = True  # the walk left the episode mid-way: the next use resets it
            self._content[task] = _digest(
                {"game": self.game, "observation": text(obs), "goal": info["goal"], "map": walk}
            )
        return self._content[task]

    def vocabulary(self, tasks_per_split: int = 16) -> list[str]:
        """The words the games print, for a word-level tiny tokenizer (one token per word, not per byte): gathered
        by playing the gold path of the first `tasks_per_split` tasks of every split; a word seen nowhere there
        still tokenizes, byte by byte."""
        texts = [self.prompt_header]
        env = TextWorldExpressTextEnv(self.game, self.game_params, self.env_step_limit, True, self.brief_rooms)
        try:
            for split in FOLDS:
                for task in self.tasks(split)[:tasks_per_split]:
                    obs, info = env.reset(task)
                    texts += [obs, info["goal"], *env.admissible_actions()]
                    for action in env.gold_actions():
                        obs, _, terminated, truncated, _ = env.step(action)
                        texts += [obs, *env.admissible_actions()]
                        if terminated or truncated:
                            break
        finally:
            env.close()
        return sorted(set(words_of(texts)))

    def close(self) -> None:
        if self._expert is not None:
            self._expert.close()
            self._expert = None

    def __getstate__(self):  # worker processes get the factory, not its expert's JVM
        return {**self.__dict__, "_expert": None}
