"""Scripted environments for the env-isolation tests (picklable: they also run inside worker processes).

`ScriptedEnv` counts down `task.variation` valid steps to a win. The task name picks a misbehaviour:

    count           a well-behaved env: terminates (won) after `variation` steps
    limit           never wins: its own step limit truncates the episode after `variation` steps
    old_shape       step returns the old 4-tuple (observation, reward, done, info)
    raise           step raises                      hang       step sleeps `HANG_S`
    hang_forever    step never returns (an hour)     die        step kills its own process (worker mode only)
    project_raise   project_action raises            reset_raise  reset raises
    bad_<field>     returns garbage in <field>: won, reward, obs, admissible, goal, info, project
"""

from __future__ import annotations

import functools
import os
import re
import time
import zlib

from epo_trl.envs.protocol import EnvFactory, TaskSpec, TextEnv
from epo_trl.rollout import CallableBackend

HANG_S = 3.0
WORDS = ["count", "zero", "won", "down", "go", "reach", "ok"]


class ScriptedEnv(TextEnv):
    def reset(self, task: TaskSpec):
        self.task, self.left = task, task.variation
        if task.task == "reset_raise":
            raise RuntimeError("scripted reset failure")
        goal = 42 if task.task == "bad_goal" else "reach zero"
        return f"count {self.left}", {"goal": goal}

    def admissible_actions(self):
        return ["go", 7] if self.task.task == "bad_admissible" else ["go"]

    def project_action(self, action: str):
        if self.task.task == "project_raise":
            raise ValueError("scripted projection failure")
        if self.task.task == "bad_project":
            return 3
        return super().project_action(action)

    def step(self, action: str):
        kind = self.task.task
        if kind == "raise":
            raise RuntimeError("scripted env failure")
        if kind == "hang":
            time.sleep(HANG_S)
        if kind == "hang_forever":
            time.sleep(3600)
        if kind == "die":
            os._exit(3)
        self.left -= 1
        done = self.left <= 0
        if kind == "limit":  # out of moves: cut off, no outcome
            return ("out of moves" if done else f"count {self.left}"), 0.5, False, done, {"won": False}
        obs = "won" if done else f"count {self.left}"
        info = {"won": done}
        if kind == "bad_won":
            info = {"won": "false"}  # a truthy string: must not count as a win
            done = True
        elif kind == "bad_reward":
            return obs, "1.0", done, False, info
        elif kind == "bad_obs":
            return None, 0.0, done, False, info
        elif kind == "bad_info":
            info = ["won"]
        elif kind == "old_shape":
            return obs, float(done), done, info
        return obs, float(done), done, False, info


class ScriptedFactory(EnvFactory):
    name = "scripted"
    prompt_header = "you count down to zero ."
    thread_safe = True

    def make(self) -> ScriptedEnv:
        return ScriptedEnv()

    def tasks(self, split: str = "train") -> list[TaskSpec]:
        return [TaskSpec("scripted", "count", n, seed) for seed, n in enumerate([1, 2, 3, 4, 1, 2, 3, 4])]


def task(kind: str, turns: int = 2, seed: int = 0) -> TaskSpec:
    return TaskSpec("scripted", kind, turns, seed)


@functools.cache
def maze_tokenizer():
    """The tiny tokenizer over the scripted envs' words and the maze's vocabulary (built once per process)."""
    from epo_trl.envs.maze import MazeFactory
    from epo_trl.models.tiny import build_tokenizer

    return build_tokenizer([*WORDS, *MazeFactory().vocabulary()])


def always_go(tokenizer):
    """A policy that writes `<action> go </action>` on every turn."""
    ids = tokenizer("<action> go </action>", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return CallableBackend(lambda prompts, n, t: [ids for _ in prompts])


def admissible_picker(tokenizer):
    """A deterministic policy that depends on the prompt: one of the listed admissible actions, by a hash."""

    def policy(prompts, n, t):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            listed = re.findall(r"admissible actions : (.*) \.", text)
            actions = listed[-1].split(" , ") if listed else ["look"]
            choice = actions[zlib.crc32(text.encode()) % len(actions)]
            out.append(tokenizer(f"<action> {choice} </action>", add_special_tokens=False)["input_ids"])
            out[-1].append(tokenizer.eos_token_id)
        return out

    return CallableBackend(policy)


def replay_tool_calls(factory, task_key: str, completion: list[dict], max_turns: int) -> bool:
    """Won, replaying a TRL rollout's parsed `act` tool calls on a fresh env of `factory` (not the adapter)."""
    env = factory.make()
    env.reset(TaskSpec.parse(task_key))
    turns = 0
    for message in completion:
        for call in message.get("tool_calls") or []:
            turns += 1
            command = env.project_action(call["function"]["arguments"]["action"])
            if command is not None:
                _, _, terminated, truncated, info = env.step(command)
                if terminated or truncated:
                    return bool(info["won"])
            if turns >= max_turns:
                return False
    return False
