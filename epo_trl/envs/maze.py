"""`maze`: a built-in, dependency-free, deterministic sparse-reward text environment.

The agent walks a grid of rooms joined by passages (a random spanning tree, so every room is reachable and
there is exactly one way into the goal room). In the `key` task the way into the goal room is a locked door:
the agent must find the key, take it, open the door and walk through. In the `reach` task the door is open.
Only reaching the goal room pays (`won`); everything else is exploration. In the `trail` task the door is open
too, the maze branches more (a random Kruskal spanning tree instead of depth-first corridors), the goal is a dead
end 3 or 4 moves from the start, and every room has a sign pointing one step along the way to it: an agent that
reads the observation wins every game, one that does not is an explorer (docs/study/setting.md has the numbers).

Actions are short commands ("go north", "take key", "open door", "look"); `project_action` is lenient and
accepts the bare words too ("north", "key"), so even a tiny random model stumbles on valid moves sometimes.

Difficulty knobs: `size` (the grid is size x size rooms), `task` ("key", "reach" or "trail"), `distractors` (useless
items lying around). Held-out splits are disjoint from `train` by content (`Layout.content_key`: passages, start,
goal, key and items), not only by seed: a held-out candidate whose maze occurs in `train` is skipped, and a split
that cannot be filled with unseen mazes is refused (a 2x2 grid has only 8 distinct `reach` mazes). `valid_unseen`
uses a larger grid (`size + 1`).
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Sequence
from typing import Any

from .protocol import EnvFactory, TaskSpec, TextEnv, unseen_tasks, words_of

DIRECTIONS = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
ITEMS = ("box", "lamp", "coin", "book", "cup")
TASKS = ("key", "reach", "trail")
# Command word -> command, for the lenient `project_action`.
_KEYWORDS = {
    **{d: f"go {d}" for d in DIRECTIONS},
    "take": "take key",
    "key": "take key",
    "open": "open door",
    "door": "open door",
    "look": "look",
}
# Seed ranges of the splits (their contents are made disjoint by `MazeFactory.tasks`).
SPLIT_SEED_OFFSET = {"train": 0, "valid_seen": 100_000, "valid_unseen": 200_000}

GOALS = {
    "key": "find the key , take it , open the locked door and reach the goal room .",
    "reach": "find the goal room and go in .",
    "trail": "follow the signs to the goal room .",
}
# `trail`: the goal's distance from the start (moves), and how many (start, goal) draws a maze gets before the
# generator gives up on it.
TRAIL_DISTANCE = (3, 4)
_TRAIL_DRAWS = 100
# Held-out candidates tried per requested task before a split is refused as unfillable by unseen mazes.
_CANDIDATES_PER_TASK = 50
# Every sentence the env can print, for `MazeFactory.vocabulary()`; keep in sync with MazeEnv's texts.
_TEXTS = [
    *GOALS.values(),
    "you are in room . exits : north south east west . you see a key box lamp coin book cup .",
    "a sign points north south east west .",
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
        self.task, self.size = task, size
        self.passages: dict[tuple[int, int], dict[str, tuple[int, int]]] = {
            (r, c): {} for r in range(size) for c in range(size)
        }
        if task == "trail":
            self._kruskal_tree(rng)
            self.start, self.goal = self._trail_ends(rng)
        else:
            self._depth_first_tree(rng)
        # The goal is a leaf: its single passage is the door.
        (door_dir_from_goal, self.door_room) = next(iter(self.passages[self.goal].items()))
        self.door_dir = OPPOSITE[door_dir_from_goal]
        others = sorted(c for c in self.passages if c != self.goal)
        start = self.start
        self.key_room = rng.choice([c for c in others if c != start] or others) if task == "key" else None
        self.items = {c: rng.choice(ITEMS) for c in rng.sample(others, min(distractors, len(others)))}
        # `trail`: each room's sign names its first step on the way to the goal.
        self.signs: dict[tuple[int, int], str] = {}
        if task == "trail":
            to_goal = self._distances(self.goal)
            for cell, exits in self.passages.items():
                steps = [d for d, nxt in sorted(exits.items()) if to_goal[nxt] == to_goal[cell] - 1]
                if steps:
                    self.signs[cell] = steps[0]

    def _link(self, cell: tuple[int, int], direction: str, nxt: tuple[int, int]) -> None:
        self.passages[cell][direction] = nxt
        self.passages[nxt][OPPOSITE[direction]] = cell

    def _kruskal_tree(self, rng: random.Random) -> None:
        """Random Kruskal spanning tree: more branching than depth-first corridors (an explorer guesses more)."""
        walls = [(c, d) for c in sorted(self.passages) for d in ("south", "east")
                 if (c[0] + DIRECTIONS[d][0], c[1] + DIRECTIONS[d][1]) in self.passages]  # fmt: skip
        rng.shuffle(walls)
        root = {c: c for c in self.passages}

        def find(c):
            while root[c] != c:
                c = root[c]
            return c

        for cell, d in walls:
            nxt = (cell[0] + DIRECTIONS[d][0], cell[1] + DIRECTIONS[d][1])
            a, b = find(cell), find(nxt)
            if a != b:
                root[a] = b
                self._link(cell, d, nxt)

    def _trail_ends(self, rng: random.Random) -> tuple[tuple[int, int], tuple[int, int]]:
        """A start and a dead-end goal TRAIL_DISTANCE moves away (another start when no dead end is that far)."""
        low, high = TRAIL_DISTANCE
        for _ in range(_TRAIL_DRAWS):
            start = rng.choice(sorted(self.passages))
            dist = self._distances(start)
            goals = sorted(c for c, p in self.passages.items() if len(p) == 1 and low <= dist[c] <= high)
            if goals:
                return start, rng.choice(goals)
        raise ValueError(f"a {self.size}x{self.size} trail maze has no dead end {low}-{high} moves from a start.")

    def _depth_first_tree(self, rng: random.Random) -> None:
        """Random depth-first spanning tree (every room reachable, no cycles); the goal is the farthest dead end."""
        size = self.size
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
            self._link(cell, d, nxt)
            seen.add(nxt)
            stack.append(nxt)
        self.start = start
        dist = self._distances(start)
        leaves = [c for c, p in self.passages.items() if len(p) == 1 and c != start]
        far = max(dist[c] for c in leaves)
        self.goal = rng.choice(sorted(c for c in leaves if dist[c] == far))

    def content_key(self) -> str:
        """A canonical hash of what an episode can tell apart: task, passages, start, goal, key room, items."""
        passages = sorted((cell, sorted(exits.items())) for cell, exits in self.passages.items())
        content = (self.task, self.size, passages, self.start, self.goal, self.key_room, sorted(self.items.items()))
        return hashlib.sha256(repr(content).encode()).hexdigest()[:16]

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
        self.door_open = task.task != "key"
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
        if self.pos in layout.signs:
            parts.append(f"a sign points {layout.signs[self.pos]} .")
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

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Gymnasium's (observation, reward, terminated, truncated, info): reaching the goal terminates the episode
        (won); the maze has no step limit of its own (the rollout's `max_turns` cuts it off)."""
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
            return "you reach the goal room . you won !", 1.0, True, False, {"won": True}
        return self._describe(prefix), 0.0, False, False, {"won": False}


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
        task: "key" (locked door, needs the key), "reach" (no lock), "trail" (signs point the way; branchy mazes,
            the goal 3-4 moves away), or "mixed" (key and reach, alternating).
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
            raise ValueError(f"Unknown maze task {task!r}; use 'key', 'reach', 'trail' or 'mixed'.")
        for name, value, low in (("size", size, 2), ("distractors", distractors, 0), ("num_train", num_train, 1),
                                 ("num_valid", num_valid, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"maze {name}={value!r} must be an integer >= {low}.")
        self.size, self.task, self.distractors = size, task, distractors
        self.num_train, self.num_valid = num_train, num_valid
        self._train_keys: frozenset[str] | None = None

    def make(self) -> MazeEnv:
        return MazeEnv(distractors=self.distractors)

    def tasks(self, split: str = "train") -> list[TaskSpec]:
        if split not in SPLIT_SEED_OFFSET:
            raise ValueError(f"Unknown split {split!r} for maze; use one of {sorted(SPLIT_SEED_OFFSET)}.")
        if split == "train":
            return self._candidates(split, self.num_train)
        # Held out = unseen by content: distinct mazes, none of which occurs in `train`.
        train = self._train_contents()
        candidates = self._candidates(split, self.num_valid * _CANDIDATES_PER_TASK)
        tasks = unseen_tasks(candidates, self.num_valid, self.content_key, train)
        if len(tasks) == self.num_valid:
            return tasks
        raise ValueError(
            f"maze split {split!r}: only {len(tasks)} of num_valid={self.num_valid} {self.task!r} mazes of size "
            f"{self._size(split)} are distinct and unseen in the {self.num_train} train tasks ({len(train)} distinct mazes); a "
            f"{self._size(split)}x{self._size(split)} grid has too few distinct mazes. Use a larger size, or "
            "fewer num_train / num_valid."
        )

    def _size(self, split: str) -> int:
        return self.size + 1 if split == "valid_unseen" else self.size

    def _candidates(self, split: str, count: int) -> list[TaskSpec]:
        kinds = ("key", "reach") if self.task == "mixed" else (self.task,)
        offset, size = SPLIT_SEED_OFFSET[split], self._size(split)
        return [TaskSpec(self.name, kinds[i % len(kinds)], size, offset + i) for i in range(count)]

    def _train_contents(self) -> frozenset[str]:
        if self._train_keys is None:
            self._train_keys = frozenset(self.content_key(t) for t in self.tasks("train"))
        return self._train_keys

    def content_key(self, task: TaskSpec) -> str:
        """What makes two tasks the same game (`Layout.content_key`); held-out splits share none with `train`."""
        return Layout(task.task, task.variation, task.seed, self.distractors).content_key()

    def solve(self, task: TaskSpec, prefix: Sequence[str] = ()) -> list[str]:
        """The expert (shortest) command sequence for `task`, from the state reached by playing `prefix`."""
        return solve(task, self.distractors, prefix)

    def vocabulary(self) -> list[str]:
        """Every word the env can print (and the header), for building a word-level tokenizer."""
        digits = [str(i) for i in range(10)]
        return sorted(set(words_of([*_TEXTS, self.prompt_header, *ITEMS, *digits])))
