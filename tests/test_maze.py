"""The built-in maze env: determinism, disjoint splits, the expert solver, vocabulary coverage."""

from __future__ import annotations

import pytest

from epo_trl.envs import make_factory, task_dataset
from epo_trl.envs.maze import MazeFactory, solve
from epo_trl.envs.protocol import TaskSpec
from epo_trl.models.tiny import build_tokenizer, words_of


def play(factory, task, actions):
    env = factory.make()
    obs, info = env.reset(task)
    texts = [obs, info["goal"]]
    done, info = False, {}
    for action in actions:
        obs, _, done, truncated, info = env.step(action)
        assert truncated is False  # the maze has no step limit of its own
        texts.append(obs)
        texts.extend(env.admissible_actions() if not done else [])
    return done, info, texts


@pytest.mark.parametrize("task", ["key", "reach", "trail"])
def test_expert_solver_wins_every_split(task):
    factory = MazeFactory(size=3, task=task, num_train=40, num_valid=20)
    for split in ("train", "valid_seen", "valid_unseen"):
        for spec in factory.tasks(split):
            done, info, _ = play(factory, spec, factory.solve(spec))
            assert done and info["won"], spec


def test_tasks_are_deterministic_and_splits_disjoint():
    factory = MazeFactory(size=3, task="mixed")
    splits = {s: factory.tasks(s) for s in ("train", "valid_seen", "valid_unseen")}
    keys = [set(t.key() for t in tasks) for tasks in splits.values()]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert {t.variation for t in splits["valid_unseen"]} == {4}  # larger layouts
    assert {t.task for t in splits["train"]} == {"key", "reach"}
    spec = splits["train"][3]
    assert play(factory, spec, ["look", "go north"])[2] == play(factory, spec, ["look", "go north"])[2]
    assert TaskSpec.parse(spec.key()) == spec
    assert make_factory("maze", size=2).tasks()[0].variation == 2
    assert len(task_dataset(factory, "valid_seen", limit=5)) == 5


def test_key_task_needs_the_key():
    factory = MazeFactory(size=3, task="key")
    spec = factory.tasks()[0]
    plan = solve(spec)
    assert "take key" in plan and "open door" in plan
    # skipping the key: the door stays locked
    without_key = [a for a in plan if a not in ("take key", "open door")]
    done, _, texts = play(factory, spec, without_key)
    assert not done and any("locked" in t or "no key" in t for t in texts)


def test_lenient_projection_and_invalid_inputs():
    env = MazeFactory().make()
    assert env.project_action("Go North!") == "go north"
    assert env.project_action("west") == "go west"
    assert env.project_action("take the key") == "take key"
    assert env.project_action("dance") is None
    with pytest.raises(RuntimeError, match="before reset"):
        env.step("go north")
    with pytest.raises(ValueError, match="Unknown split"):
        MazeFactory().tasks("test")


def test_vocabulary_covers_everything_the_env_prints():
    factory = MazeFactory(size=3, task="mixed", distractors=3, num_train=30, num_valid=10)
    tokenizer = build_tokenizer(factory.vocabulary())
    unk = tokenizer.unk_token_id
    texts = [factory.prompt_header]
    for spec in factory.tasks("train") + factory.tasks("valid_unseen"):
        for actions in (factory.solve(spec), ["look", "take key", "open door", "go north", "go south", "go east"]):
            texts += play(factory, spec, actions)[2]
    for text in texts:
        assert unk not in tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert set(words_of(texts)) <= set(factory.vocabulary()) | set(words_of(["0 1 2 3 4 5 6 7 8 9"]))


def test_expert_replans_from_the_state_a_prefix_reaches():
    factory = MazeFactory(size=2, task="reach", distractors=0)
    spec = factory.tasks("train")[0]  # a path of 4 rooms: start -south-> A -west-> B -north-> goal
    assert factory.solve(spec) == ["go south", "go west", "go north"]
    assert factory.solve(spec, ["go south"]) == ["go west", "go north"]
    assert factory.solve(spec, ["look"]) == ["go south", "go west", "go north"]  # a wasted turn changes nothing
    assert factory.solve(spec, ["go south", "go north"]) == ["go south", "go west", "go north"]  # back at the start
    assert factory.solve(spec, ["go south", "go west", "go north"]) == []  # already won
    with pytest.raises(ValueError, match="after winning"):
        factory.solve(spec, ["go south", "go west", "go north", "look"])
    keyed = MazeFactory(size=3, task="key")
    spec = keyed.tasks()[0]
    plan = keyed.solve(spec)
    taken = plan.index("take key") + 1
    assert keyed.solve(spec, plan[:taken]) == plan[taken:]  # the key is kept


def test_trail_signs_point_along_the_expert_path():
    """Following the sign of every room is the expert's path; the goal is a dead end 3-4 moves from the start."""
    factory = MazeFactory(size=4, task="trail", distractors=0)
    for spec in factory.tasks("train")[:32]:
        env = factory.make()
        obs, _ = env.reset(spec)
        moves = []
        while "you won" not in obs:
            sign = obs.split("a sign points ")[1].split(" .")[0]
            moves.append(f"go {sign}")
            obs, *_ = env.step(moves[-1])
            assert len(moves) <= 4
        assert moves == factory.solve(spec) and 3 <= len(moves) <= 4, spec
