"""`maze`: a built-in, dependency-free, deterministic sparse-reward text environment.

The agent walks a grid of rooms joined by passages (a random spanning tree, so every room is reachable and
there is exactly one way into the goal room). In the `key` task the way into the goal room is a locked door:
the agent must find the key, take it, open the door and walk through. In the `reach` task the door is open.
Only reaching the goal room pays (`won`); everything else is exploration.

Actions are short commands ("go north", "take key", "open door", "look"); `project_action` is lenient and
accepts the bare words too ("north", "key"), so even a tiny random model stumbles on valid moves sometimes.

Difficulty knobs: `size` (the grid is size x size rooms), `task` ("key" or "reach"), `distractors` (useless
items lying around). Splits are disjoint by seed range; `valid_unseen` uses a larger grid (`size + 1`).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from typing import Any

from .protocol import EnvFactory, TaskSpec, TextEnv, words_of

DIRECTIONS = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
ITEMS = ("box", "lamp", "coin", "book", "cup")
TASKS = ("key", "reach")
# Command word -> command, for the lenient `project_action`.
_KEYWORDS = {
    **{d: f"go {d}" for d in DIRECTIONS},
    "take": "take key",
    "key": "take key",
    "open": "open door",
    "door": "open door",
    "look": "look",
}
# Seed ranges of the splits: disjoint by construction.
SPLIT_SEED_OFFSET = {"train": 0, "valid_seen": 100_000, "valid_unseen": 200_000}

GOALS = {
    "key": "find the key , take it , open the locked door and reach the goal room .",
    "reach": "find the goal room and go in .",
}
# Every sentence the env can print, for `MazeFactory.vocabulary()`; keep in sync with MazeEnv's texts.
_TEXTS = [
    *GOALS.values(),
    "you are in room . exits : north south east west . you see a key box lamp coin book cup .",
    "the door to the north south east west is locked open . you have the key .",
    "you take the key . you open the door . you can not go that way . nothing happens .",
    "there is no key here . you have no key . there is no door here .",
    "you reach the goal room . you won !",
    "go take open look key door",
]


class Layout:
    """A generated maze: passages between cells, the start, the goal, the locked door and item places."""

    def __init__(self, task: str, size: int, seed: int, distractors: int):
        if task not in TASKS:
            raise ValueError(f"Unknown maze task {task!r}; use one of {TASKS}.")
        if size < 2:
            raise ValueError(f"Maze size must be >= 2 (got {size}); the goal needs a room of its own.")
        rng = random.Random(f"maze|{task}|{size}|{seed}")
        self.size = size
        self.passages: dict[tuple[int, int], dict[str, tuple[int, int]]] = {
            (r, c): {} for r in range(size) for c in range(size)
        }
        # Random depth-first spanning tree: every room reachable, no cycles.
        start = (rng.randrange(size), rng.randrange(size))
        stack, seen = [start], {start}
        while stack:
            cell = stack[-1]
            options = [
                (d, (cell[0] + dr, cell[1] + dc))
                for d, (dr, dc) in DIRECTIONS.items()
                if (cell[0] + dr, cell[1] + dc) in self.passages and (cell[0] + dr, cell[1] + dc) not in seen
            ]
            if not options:
                stack.pop()
                continue
            d, nxt = rng.choice(options)
            self.passages[cell][d] = nxt
            self.passages[nxt][OPPOSITE[d]] = cell
            seen.add(nxt)
            stack.append(nxt)
        self.start = start
        dist = self._distances(start)
        leaves = [c for c, p in self.passages.items() if len(p) == 1 and c != start]
        far = max(dist[c] for c in leaves)
        self.goal = rng.choice(sorted(c for c in leaves if dist[c] == far))
        # The goal is a leaf: its single passage is the door.
        (door_dir_from_goal, self.door_room) = next(iter(self.passages[self.goal].items()))
        self.door_dir = OPPOSITE[door_dir_from_goal]
        others = sorted(c for c in self.passages if c != self.goal)
        self.key_room = rng.choice([c for c in others if c != start] or others) if task == "key" else None
        self.items = {c: rng.choice(ITEMS) for c in rng.sample(others, min(distractors, len(others)))}

    def _distances(self, src: tuple[int, int]) -> dict[tuple[int, int], int]:
        dist, queue = {src: 0}, deque([src])
        while queue:
            cell = queue.popleft()
            for nxt in self.passages[cell].values():
                if nxt not in dist:
                    dist[nxt] = dist[cell] + 1
                    queue.append(nxt)
        return dist

    def room_id(self, cell: tuple[int, int]) -> int:
        return cell[0] * self.size + cell[1]


class MazeEnv(TextEnv):
    """One live maze; `reset(task)` builds the layout of the TaskSpec deterministically."""

    def __init__(self, distractors: int = 1):
        self.distractors = distractors
        self.layout: Layout | None = None

    def reset(self, task: TaskSpec) -> tuple[str, dict[str, Any]]:
        self.layout = Layout(task.task, task.variation, task.seed, self.distractors)
        self.pos = self.layout.start
        self.has_key = False
        self.door_open = task.task == "reach"
        self.key_room = self.layout.key_room
        self.done = False
        self.goal = GOALS[task.task]
        return self._describe(), {"goal": self.goal, "won": False}

    def _require_reset(self) -> Layout:
        if self.layout is None:
            raise RuntimeError("MazeEnv.step() called before reset(task); reset the env with a TaskSpec first.")
        return self.layout

    def _describe(self, prefix: str = "") -> str:
        layout = self._require_reset()
        exits = " ".join(sorted(layout.passages[self.pos]))
        parts = [prefix, f"you are in room {layout.room_id(self.pos)} . exits : {exits} ."]
        seen = [item for item in [layout.items.get(self.pos)] if item]
        if self.key_room == self.pos:
            seen.insert(0, "key")
        if seen:
            parts.append("you see a " + " , a ".join(seen) + " .")
        if self.pos == layout.door_room:
            state = "open" if self.door_open else "locked"
            parts.append(f"the door to the {layout.door_dir} is {state} .")
        return " ".join(p for p in parts if p)

    def admissible_actions(self) -> list[str]:
        layout = self._require_reset()
        actions = ["look"] + [f"go {d}" for d in sorted(layout.passages[self.pos])]
        if self.key_room == self.pos:
            actions.append("take key")
        if self.pos == layout.door_room and not self.door_open and self.has_key:
            actions.append("open door")
        return actions

    def project_action(self, action: str) -> str | None:
        """Lenient: the earliest command word in the text ("go north", "north", "take key", "key", "open" ...).

        Substrings count too, so text whose words run together (byte-level tokenizers decoding random tokens)
        still yields the command it spells.
        """
        text = action.lower()
        found = [(text.find(word), command) for word, command in _KEYWORDS.items() if word in text]
        return min(found)[1] if found else None

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        layout = self._require_reset()
        if self.done:
            raise RuntimeError("MazeEnv.step() called after the episode ended; call reset(task) to start a new one.")
        command = self.project_action(action) or action
        prefix = "nothing happens ."
        if command.startswith("go "):
            direction = command[3:]
            nxt = layout.passages[self.pos].get(direction)
            if nxt is None:
                prefix = "you can not go that way ."
            elif nxt == layout.goal and not self.door_open:
                prefix = f"the door to the {direction} is locked ."
            else:
                self.pos = nxt
                prefix = ""
        elif command == "take key":
            if self.key_room == self.pos:
                self.has_key, self.key_room = True, None
                prefix = "you take the key ."
            else:
                prefix = "there is no key here ."
        elif command == "open door":
            if self.pos != layout.door_room:
                prefix = "there is no door here ."
            elif not self.has_key and not self.door_open:
                prefix = "you have no key ."
            else:
                self.door_open = True
                prefix = "you open the door ."
        elif command == "look":
            prefix = "you have the key ." if self.has_key else ""
        if self.pos == layout.goal:
            self.done = True
            return "you reach the goal room . you won !", 1.0, True, {"won": True}
        return self._describe(prefix), 0.0, False, {"won": False}


def solve(task: TaskSpec, distractors: int = 0, prefix: Sequence[str] = ()) -> list[str]:
    """Shortest command sequence that wins `task` after the commands `prefix` were played (breadth-first search
    over (room, key, door) states); [] when `prefix` already won."""
    env = MazeEnv(distractors)
    env.reset(task)
    for command in prefix:
        if env.done:
            raise ValueError(f"prefix {list(prefix)} goes on after winning {task.key()}.")
        env.step(command)
    if env.done:
        return []
    layout = env._require_reset()
    start = (env.pos, env.has_key, env.door_open)  # (cell, has_key, door_open)
    parents: dict[tuple, tuple | None] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        cell, has_key, door_open = state
        if cell == layout.goal:
            path = []
            while parents[state] is not None:
                state, command = parents[state]
                path.append(command)
            return path[::-1]
        moves = []
        for d, nxt in layout.passages[cell].items():
            if nxt != layout.goal or door_open:
                moves.append((f"go {d}", (nxt, has_key, door_open)))
        if layout.key_room == cell and not has_key:
            moves.append(("take key", (cell, True, door_open)))
        if cell == layout.door_room and has_key and not door_open:
            moves.append(("open door", (cell, has_key, True)))
        for command, nxt_state in moves:
            if nxt_state not in parents:
                parents[nxt_state] = (state, command)
                queue.append(nxt_state)
    raise RuntimeError(f"Maze {task.key()} has no solution; this is a generator bug, please report it.")


class MazeFactory(EnvFactory):
    """Builds maze envs and lists deterministic task instances per split.

    Args:
        size: grid side for `train` and `valid_seen` (`valid_unseen` uses `size + 1`).
        task: "key" (locked door, needs the key) or "reach" (no lock), or "mixed" (both, alternating).
        distractors: useless items placed in rooms.
        num_train / num_valid: task instances per split.
    """

    name = "maze"
    prompt_header = (
        "you are an agent in a maze of rooms . move between rooms with go north , go south , go east or go west ."
    )

    def __init__(
        self, size: int = 3, task: str = "key", distractors: int = 1, num_train: int = 256, num_valid: int = 64
    ):
        if task not in (*TASKS, "mixed"):
            raise ValueError(f"Unknown maze task {task!r}; use 'key', 'reach' or 'mixed'.")
        for name, value, low in (("size", size, 2), ("distractors", distractors, 0), ("num_train", num_train, 1),
                                 ("num_valid", num_valid, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"maze {name}={value!r} must be an integer >= {low}.")
        self.size, self.task, self.distractors = size, task, distractors
        self.num_train, self.num_valid = num_train, num_valid

    def make(self) -> MazeEnv:
        return MazeEnv(distractors=self.distractors)

    def tasks(self, split: str = "train") -> list[TaskSpec]:
        if split not in SPLIT_SEED_OFFSET:
            raise ValueError(f"Unknown split {split!r} for maze; use one of {sorted(SPLIT_SEED_OFFSET)}.")
        size = self.size + 1 if split == "valid_unseen" else self.size
        count = self.num_train if split == "train" else self.num_valid
        kinds = TASKS if self.task == "mixed" else (self.task,)
        offset = SPLIT_SEED_OFFSET[split]
        return [TaskSpec(self.name, kinds[i % len(kinds)], size, offset + i) for i in range(count)]

    def solve(self, task: TaskSpec, prefix: Sequence[str] = ()) -> list[str]:
        """The expert (shortest) command sequence for `task`, from the state reached by playing `prefix`."""
        return solve(task, self.distractors, prefix)

    def vocabulary(self) -> list[str]:
        """Every word the env can print (and the header), for building a word-level tokenizer."""
        digits = [str(i) for i in range(10)]
        return sorted(set(words_of([*_TEXTS, self.prompt_header, *ITEMS, *digits])))
