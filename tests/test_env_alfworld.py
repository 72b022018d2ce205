"""ALFWorld adapter on small real games generated from the alfworld package's own domain and grammar."""

from __future__ import annotations

import pytest

pytest.importorskip("alfworld")

from epo_trl.envs import make_factory  # noqa: E402
from epo_trl.envs.alfworld.env import TASK_TYPES, ALFWorldFactory  # noqa: E402
from epo_trl.envs.alfworld.games import SAMPLE_GAMES  # noqa: E402


@pytest.fixture(scope="module")
def data_root(alfworld_data):
    return alfworld_data


@pytest.fixture(scope="module")
def factory(alfworld_factory):
    return alfworld_factory


@pytest.fixture(scope="module")
def env(factory):
    e = factory.make()
    yield e
    e.close()


def _all_tasks(factory):
    return [t for split in ("train", "valid_seen", "valid_unseen") for t in factory.tasks(split)]


def test_sample_games_load_in_their_splits(factory):
    train, seen, unseen = factory.tasks("train"), factory.tasks("valid_seen"), factory.tasks("valid_unseen")
    assert len(train) + len(seen) + len(unseen) == len(SAMPLE_GAMES)
    assert {factory.task_type(t) for t in train} == {"pick_and_place_simple", "pick_clean_then_place_in_recep"}
    assert [factory.task_type(t) for t in unseen] == ["look_at_obj_in_light"]
    for t in train + seen + unseen:
        assert t.env == "alfworld" and t.task.startswith("json_2.1.1/") and t.variation == 0
        assert factory.task_type(t) in TASK_TYPES


@pytest.mark.slow
def test_expert_plan_wins_every_sample_game(factory, env):
    for task in _all_tasks(factory):
        obs, info = env.reset(task)
        assert info["goal"] and info["won"] is False and "Welcome" not in obs
        rewards, done = [], False
        while not done and len(rewards) < 50:
            obs, reward, done, truncated, info = env.step(env.expert_plan()[0])
            rewards.append(reward)
        assert done and info["won"] is True, task.task
        assert sum(rewards) == 10.0 and rewards[-1] == 10.0


def test_planner_expert_wins(data_root):
    f = ALFWorldFactory(data_path=data_root, expert="planner", task_types=["look_at_obj_in_light"])
    e = f.make()
    try:
        e.reset(f.tasks("valid_unseen")[0])
        total, done, info = 0.0, False, {}
        for action in e.expert_plan():  # the planner gives the whole plan at once
            _, reward, done, truncated, info = e.step(action)
            total += reward
        assert done and info["won"] and total == 10.0
    finally:
        e.close()


def test_invalid_command_does_nothing(factory, env):
    env.reset(factory.tasks("train")[0])
    cmd = env.project_action("Fly To The Moon")
    assert cmd == "fly to the moon"
    obs, reward, done, truncated, info = env.step(cmd)
    assert obs == "Nothing happens." and reward == 0.0 and not done and info["won"] is False


def test_admissible_and_projection(factory, env):
    env.reset(factory.tasks("train")[0])
    valid = env.admissible_actions()
    assert "go to fridge 1" in valid and "help" not in valid
    assert env.project_action("  Go To   FRIDGE 1 ") == "go to fridge 1"
    assert env.project_action(" \n ") is None
    obs, *_ = env.step(env.project_action("go to fridge 1"))
    assert obs.startswith("You arrive at fridge 1")


def test_same_taskspec_same_first_observation(factory, env):
    tasks = factory.tasks("train")
    other = factory.make()
    try:
        a = env.reset(tasks[0])
        b = other.reset(tasks[0])
        assert a[0] == b[0] and a[1]["goal"] == b[1]["goal"]
        c = other.reset(tasks[1])
        assert (a[0], a[1]["goal"]) != (c[0], c[1]["goal"])
    finally:
        other.close()
        other.close()  # closing twice is a no-op


def test_task_type_filter(data_root):
    f = ALFWorldFactory(data_path=data_root, task_types=["pick_clean_then_place_in_recep"])
    assert [f.task_type(t) for t in f.tasks("train")] == ["pick_clean_then_place_in_recep"]
    assert f.tasks("valid_unseen") == [] and f.task_types() == ["pick_clean_then_place_in_recep"]
    with pytest.raises(ValueError, match="Unknown ALFWorld task types"):
        ALFWorldFactory(data_path=data_root, task_types=["make_coffee"])


def test_missing_data_gives_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "no_such_alfworld"
    monkeypatch.setenv("ALFWORLD_DATA", str(missing))
    f = make_factory("alfworld")
    with pytest.raises(
        FileNotFoundError, match=r"(?s)no_such_alfworld.*json_2\.1\.1.*alfworld-download.*ALFWORLD_DATA"
    ):
        f.tasks("train")
    with pytest.raises(FileNotFoundError, match="alfworld-download"):
        f.make()


@pytest.mark.slow
def test_expert_plans_win_through_the_parallel_rollout_engine(factory, env):
    """All sample games at once through the lockstep engine (4 worker threads share TextWorld's parser)."""
    from epo_trl.models.tiny import build_tokenizer
    from epo_trl.models.warmstart import PlanBackend
    from epo_trl.rollout import RolloutConfig, RolloutEngine

    tasks = _all_tasks(factory) * 2  # 8 episodes, two per game, stepped concurrently
    plans = []
    for task in tasks:  # the built-in expert's plan, recorded on a separate env
        env.reset(task)
        plan, done = [], False
        while not done:
            action = env.expert_plan()[0]
            plan.append(action)
            _, _, done, truncated, _ = env.step(action)
        plans.append(plan)
    tokenizer = build_tokenizer()
    engine = RolloutEngine(factory, tokenizer, RolloutConfig(max_turns=50, max_turn_tokens=48, num_workers=4))
    try:
        result = engine.run(tasks, PlanBackend(plans, tokenizer), "step")
    finally:
        engine.close()
    assert not any(e.failed for e in result.episodes), [e.failure for e in result.episodes]
    assert all(e.won and e.episode_return(engine.config) == 10.0 for e in result.episodes)


def _play(factory, task, commands):
    env = factory.make()
    try:
        env.reset(task)
        info, done = {"won": False}, False
        for command in commands:
            assert not done, "the plan goes on after the game ended"
            _, _, done, truncated, info = env.step(command)
        return done, info["won"]
    finally:
        env.close()


@pytest.mark.slow
def test_solve_wins_and_replans_after_a_detour(data_root):
    import pickle

    # no expert attached to the factory's envs: solve plays its own (handcoded) expert game
    factory = ALFWorldFactory(data_path=data_root)
    task = factory.tasks("train")[0]  # put an apple in the fridge
    plan = factory.solve(task)
    assert "move apple 1 to fridge 1" == plan[-1] and _play(factory, task, plan) == (True, True)
    # a detour the gold path never takes (the noisy demonstrator's random action): the expert re-plans from there
    detour = ["go to cabinet 1", "open cabinet 1"]
    rest = factory.solve(task, detour)
    assert rest and _play(factory, task, detour + rest) == (True, True)
    # a prefix that already wins leaves nothing to do
    assert factory.solve(task, plan) == []
    # worker processes receive the factory without the expert's live game
    clone = pickle.loads(pickle.dumps(factory))
    assert clone._expert_env is None and clone.solve(task) == plan
    factory.close()
    assert factory._expert_env is None


def test_sample_games_option_writes_the_games(tmp_path):
    factory = ALFWorldFactory(data_path=tmp_path / "games", sample_games=True)
    assert len(_all_tasks(factory)) == len(SAMPLE_GAMES)
    assert make_factory("alfworld", data_path=str(tmp_path / "games"), sample_games=True).tasks("valid_unseen")
