"""Any `EnvFactory` as a TRL `environment_factory`: our environments inside TRL's own tool-calling loop.

    from trl import GRPOTrainer
    from epo_trl.envs import make_factory
    from epo_trl.envs.trl_env import tool_dataset, trl_environment

    factory = make_factory("maze")
    trainer = GRPOTrainer(model, None, args=args, train_dataset=tool_dataset(factory),
                          environment_factory=trl_environment(factory))

TRL builds one instance per rollout and calls `reset(**row)` with the dataset row: the row's `task` column (a
`TaskSpec.key()`) picks the task instance, so the `num_generations` copies of a row (a GRPO group) play the same
one. The instance exposes one tool, `act(action)`, and `get_reward()` (1.0 when the episode was won, else 0.0).
The env's outputs go through the same type checks as in our rollouts. After each call the instance holds the episode
so far: `done`, `terminated` (the task ended it), `truncated` (the env's step limit or `max_turns` cut it off), `won`
and `env_return` (the sum of the env's own step rewards).
"""

from __future__ import annotations

import logging

from .protocol import EnvFactory, TaskSpec, TextEnv, check_admissible, check_projection, check_reset, check_step

logger = logging.getLogger(__name__)

INSTRUCTION = (
    "Take one action per call of the `act` tool; its result is the new observation. Keep acting until the "
    "episode is over, then stop calling tools."
)


def tool_dataset(factory: EnvFactory, split: str = "train", limit: int | None = None, instruction: str = INSTRUCTION):
    """A conversational `datasets.Dataset` for TRL's tool loop: `prompt` (the env's header and how to act) and
    `task` (the task key `reset` plays), one row per task instance of `split`."""
    from datasets import Dataset

    tasks = factory.tasks(split)[:limit]
    if not tasks:
        raise ValueError(f"Environment {factory.name!r} has no tasks in split {split!r}.")
    prompt = [{"role": "user", "content": f"{factory.prompt_header}\n{instruction}"}]
    return Dataset.from_dict({"prompt": [prompt] * len(tasks), "task": [t.key() for t in tasks]})


def trl_environment(factory: EnvFactory, max_turns: int | None = None, task_column: str = "task") -> type:
    """A class to pass as TRL's `environment_factory` that plays `factory`'s tasks; see the module docstring.

    `max_turns` ends an episode after that many `act` calls (TRL's own limit is `max_tool_calling_iterations`,
    which counts generations, not actions). An env that raises is closed and rebuilt on the next `reset`; its
    rollout is reported (a warning naming the task) and scored None: TRL excludes it from that reward column, and
    a rollout no reward function scores from its group's baseline (advantage 0)."""
    name = factory.name

    class Environment:
        def __init__(self):
            self._env: TextEnv | None = None  # built on the first reset, then reused: TRL pools instances
            self._task: TaskSpec | None = None

        def reset(self, **row) -> str:
            if task_column not in row:
                raise ValueError(
                    f"{type(self).__name__}.reset got a row without a {task_column!r} column (columns: "
                    f"{sorted(row)}). Build the dataset with epo_trl.envs.trl_env.tool_dataset(factory)."
                )
            self._task = TaskSpec.parse(row[task_column])
            self.turns, self.done, self.won, self.crashed = 0, False, False, False
            self.terminated, self.truncated, self.env_return = False, False, 0.0
            try:
                if self._env is None:
                    self._env = factory.make()
                obs, goal = check_reset(name, self._env.reset(self._task))
                actions = check_admissible(name, self._env.admissible_actions())
            except Exception as e:
                self._crash(e)
                return f"\nThe environment failed to start: {e}"
            return f"\nGoal: {goal}\nObservation: {obs}" + _actions_line(actions)

        def act(self, action: str) -> str:
            """Take one action in the environment.

            Args:
                action: The command to carry out, e.g. one of the admissible actions.
            """
            if self.done:
                raise ValueError("The episode is over: stop calling tools.")
            env = self._env
            self.turns += 1
            try:
                command = check_projection(name, env.project_action(str(action)))
                if command is None:
                    obs, actions = (
                        f"{action!r} is not a valid action.",
                        check_admissible(name, env.admissible_actions()),
                    )
                else:
                    step = check_step(name, env.step(command))
                    obs, self.won, self.env_return = step.obs, step.won, self.env_return + step.reward
                    self.terminated, self.truncated = step.terminated, step.truncated
                    self.done = step.terminated or step.truncated
                    actions = None if self.done else check_admissible(name, env.admissible_actions())
            except Exception as e:
                self._crash(e)
                return f"The environment failed: {e}. The episode is over."
            if not self.done and max_turns is not None and self.turns >= max_turns:
                self.done = self.truncated = True  # cut off by this adapter's own action limit
            if self.done:
                return f"{obs}\nThe episode is over ({'won' if self.won else 'not won'})."
            return obs + _actions_line(actions)

        def get_reward(self) -> float | None:
            return None if self.crashed else float(self.won)

        def _crash(self, error: Exception) -> None:
            logger.warning("%s: task %s crashed (%s); the env is rebuilt at the next reset", name, self._task, error)
            self.crashed, self.done = True, True
            if self._env is not None:
                try:
                    self._env.close()
                except Exception:  # noqa: BLE001 - a crashed env may fail to close; it is dropped either way
                    pass
            self._env = None

        def __del__(self):
            if getattr(self, "_env", None) is not None:
                self._env.close()

    Environment.__name__ = Environment.__qualname__ = f"{type(factory).__name__.removesuffix('Factory')}Environment"
    return Environment


def _actions_line(actions: list[str] | None) -> str:
    return f"\nAdmissible actions: {', '.join(actions)}" if actions else ""
