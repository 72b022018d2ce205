"""ScienceWorld adapter: real simulator (JVM), gold paths, losses, splits, crash recovery, errors."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

pytest.importorskip("scienceworld")

from epo_trl.envs import TaskSpec, make_factory  # noqa: E402
from epo_trl.envs import scienceworld as sw_mod  # noqa: E402
from epo_trl.envs.scienceworld import ScienceWorldCrashedError, ScienceWorldFactory  # noqa: E402

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="ScienceWorld needs a Java runtime")


@pytest.fixture(scope="module")
def factory():
    return ScienceWorldFactory(generate_gold_path=True)


@pytest.fixture(scope="module")
def env(factory):
    e = factory.make()
    yield e
    e.close()


def _spec(task: str, variation: int = 0) -> TaskSpec:
    return TaskSpec(env="scienceworld", task=task, variation=variation)


@needs_java
@pytest.mark.slow
@pytest.mark.parametrize("task", ["find-plant", "boil"])
def test_gold_path_wins_with_return_10(env, task):
    obs, info = env.reset(_spec(task))
    assert obs and info["goal"].startswith("Your task is to") and info["won"] is False
    rewards, done, info = [], False, {}
    for action in env.gold_actions():
        obs, reward, done, truncated, info = env.step(action)
        rewards.append(reward)
        if done:
            break
    assert done and info["won"] is True and info["score"] == 100
    assert sum(rewards) == 10.0 and rewards[-1] == 10.0


@needs_java
@pytest.mark.slow
def test_solve_is_the_gold_path_and_wins():
    import pickle

    factory = ScienceWorldFactory(task_names=["lifespan-longest-lived"], held_out_tasks=(), max_variations_per_task=2)
    task = factory.tasks("train")[0]
    plan = factory.solve(task)
    # the sim's gold path for this family: walk outside, focus on the longest-lived animal (the win), then 'wait1',
    # which solve drops: the game is over at the focus, and a plan must end with its episode
    gold = factory._expert.gold_actions()
    assert gold[-1] == "wait1" and plan == gold[:-1] and plan[-1].startswith("focus on")
    env = factory.make()  # a plain env (no gold path of its own) wins by playing it
    try:
        env.reset(task)
        for action in plan:
            _, reward, done, truncated, info = env.step(action)
        assert done and info["won"] and reward == 10.0
    finally:
        env.close()
    assert factory.solve(task, plan[:2]) == plan[2:]
    with pytest.raises(ValueError, match="warmstart_noisy_steps: 0"):
        factory.solve(task, ["look around", "inventory"])
    clone = pickle.loads(pickle.dumps(factory))  # worker processes get no JVM handle
    assert clone._expert is None and clone._gold[task] == plan
    factory.close()
    assert factory._expert is None


@needs_java
@pytest.mark.slow
def test_nonsense_policy_does_not_win(env):
    env.reset(_spec("boil"))
    total = 0.0
    for _ in range(10):
        obs, reward, done, truncated, info = env.step("dance with the purple unicorn")
        total += reward
        assert obs == "No known action matches that input."
        assert not done and not truncated and info["won"] is False
    assert total == 0.0


@needs_java
@pytest.mark.slow
def test_wrong_focus_is_a_loss(env):
    env.reset(_spec("boil"))
    obs, reward, done, truncated, info = env.step("focus on air")  # the task is about water
    assert done is True and truncated is False and info["won"] is False and reward == 0.0  # a loss: terminated
    assert info["score"] < 0 and info["failed"] is True
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look around")


@needs_java
@pytest.mark.slow
def test_the_move_limit_truncates():
    """Past `env_step_limit` moves without an outcome the episode is truncated, not terminated (the old `done` merged
    the two)."""
    e = sw_mod.ScienceWorldTextEnv(env_step_limit=2)
    try:
        e.reset(_spec("boil"))
        flags = []
        while len(flags) < 6 and not (flags and any(flags[-1][:2])):
            _, _, terminated, truncated, info = e.step("wait1")
            flags.append((terminated, truncated, info["won"], info["moves"]))
        assert [f[:3] for f in flags] == [(False, False, False)] * (len(flags) - 1) + [(False, True, False)]
        assert flags[-1][3] > 2 >= flags[-2][3]
    finally:
        e.close()


@needs_java
@pytest.mark.slow
def test_admissible_actions_lazy_and_nonempty(env):
    env.reset(_spec("boil"))
    valid = env.admissible_actions()
    assert isinstance(valid, list) and len(valid) > 10 and all(isinstance(a, str) for a in valid)
    assert "look around" in valid
    assert env.admissible_actions() == valid  # cached for this state
    env.step("look around")
    assert env._valid_cache is None  # a step drops the cache; the list is rebuilt only on demand
    assert env.admissible_actions()


@needs_java
@pytest.mark.slow
def test_admissible_templates_format():
    e = ScienceWorldFactory(task_names=["boil"], held_out_tasks=(), valid_actions_format="templates").make()
    try:
        e.reset(_spec("boil"))
        hint = e.admissible_actions()
        assert "open OBJ" in hint and "look around" in hint
        assert hint[-1].startswith("(OBJ is one of: ") and "air" in hint[-1]
    finally:
        e.close()


@needs_java
@pytest.mark.slow
def test_same_taskspec_same_first_observation(factory, env):
    other = factory.make()
    try:
        a = env.reset(_spec("boil", 3))
        b = other.reset(_spec("boil", 3))
        assert a[0] == b[0] and a[1]["goal"] == b[1]["goal"]
        c = other.reset(_spec("find-plant", 3))
        assert (c[0], c[1]["goal"]) != (a[0], a[1]["goal"])
    finally:
        other.close()


@needs_java
@pytest.mark.slow
def test_crashed_jvm_raises_then_reset_restarts(factory):
    e = factory.make()
    try:
        e.reset(_spec("find-plant"))
        proc = e.simulator._gateway.java_process
        proc.kill()
        proc.wait()
        with pytest.raises(ScienceWorldCrashedError, match="next reset"):
            e.step("look around")
        obs, info = e.reset(_spec("find-plant"))
        assert obs and e.simulator._gateway.java_process.pid != proc.pid
        assert e.step("look around")[0]
    finally:
        e.close()
        e.close()  # closing twice is a no-op


@needs_java
@pytest.mark.slow
def test_jvm_is_memory_bounded_and_env_restored(env):
    env.reset(_spec("find-plant"))
    assert os.environ.get("JAVA_TOOL_OPTIONS") != "-Xmx512m -XX:+UseSerialGC"  # set only while launching
    environ = f"/proc/{env.simulator._gateway.java_process.pid}/environ"
    if os.path.exists(environ):
        with open(environ, "rb") as f:
            assert b"JAVA_TOOL_OPTIONS=-Xmx512m -XX:+UseSerialGC" in f.read().split(b"\0")


@needs_java
@pytest.mark.slow
def test_splits_disjoint():
    f = ScienceWorldFactory(task_names=["boil", "melt"], held_out_tasks=["freeze"])
    train, seen, unseen = f.tasks("train"), f.tasks("valid_seen"), f.tasks("valid_unseen")
    assert train and seen and unseen
    for task in ("boil", "melt"):
        tr = {t.variation for t in train if t.task == task}
        vs = {t.variation for t in seen if t.task == task}
        assert tr and vs and not tr & vs
    assert {t.task for t in unseen} == {"freeze"}
    assert not {t.task for t in unseen} & {t.task for t in train}
    assert train[0].task != train[1].task  # interleaved: a prefix covers every task type
    capped = ScienceWorldFactory(task_names=["boil"], held_out_tasks=(), max_variations_per_task=2)
    assert len(capped.tasks("train")) == 2 and all(t.env == "scienceworld" for t in capped.tasks("train"))
    assert f.task_type(train[0]) == train[0].task


def test_default_held_out_tasks_are_not_trained():
    f = ScienceWorldFactory()
    assert set(f.held_out_tasks) == set(sw_mod.DEFAULT_HELD_OUT_TASKS)
    assert not set(f.task_names) & set(f.held_out_tasks)
    assert len(f.task_names) + len(f.held_out_tasks) == 30
    with pytest.raises(ValueError, match="both trained"):
        ScienceWorldFactory(task_names=["freeze"])
    with pytest.raises(ValueError, match="Unknown ScienceWorld task"):
        ScienceWorldFactory(task_names=["boil-the-ocean"])


def test_registry_builds_factory():
    f = make_factory("scienceworld", task_names=["boil"], held_out_tasks=())
    assert isinstance(f, ScienceWorldFactory) and f.name == "scienceworld"
    assert "ScienceWorld" in f.prompt_header


def test_missing_java_gives_clear_error(monkeypatch):
    monkeypatch.setattr(sw_mod.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"(?s)no `java`.*Java runtime >= 11.*default-jre-headless"):
        ScienceWorldFactory().make()


def test_missing_package_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "scienceworld", None)
    with pytest.raises(ImportError, match=r"pip install 'epo-trl\[scienceworld\]'"):
        ScienceWorldFactory()


@needs_java
def test_project_action_normalises():
    e = ScienceWorldFactory().make()  # no JVM until the first reset
    try:
        assert e.project_action("  Open   Door to KITCHEN \n") == "open door to kitchen"
        assert e.project_action("   ") is None
    finally:
        e.close()
