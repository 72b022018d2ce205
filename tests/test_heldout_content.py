"""Held-out splits are unseen by content, not only by seed: no `valid_seen` / `valid_unseen` task builds the game
(`EnvFactory.content_key`) that a `train` task builds, nor one that an earlier task of its own split builds.

One test per env (maze, textworld_express, scienceworld, alfworld), each on what its factory lists, plus tests that
the check can fail (`overlaps` reports copied content) and that the factories skip what it reports."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest

from epo_trl.envs.maze import MazeFactory
from epo_trl.envs.protocol import EnvFactory, TaskSpec

HELD_OUT = ("valid_seen", "valid_unseen")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the env runs in a Java runtime")


def overlaps(factory: EnvFactory, splits: dict[str, list[TaskSpec]]) -> list[str]:
    """Every held-out task of `splits` whose `content_key` is that of a train task or of an earlier task of its own
    split, as 'split task-key = split task-key' lines (empty: unseen by content)."""
    train: dict[str, str] = {}
    for task in splits["train"]:
        train.setdefault(_key(factory, task), task.key())
    found = []
    for split, tasks in splits.items():
        if split == "train":
            continue
        earlier: dict[str, str] = {}
        for task in tasks:
            key = _key(factory, task)
            if key in train:
                found.append(f"{split} {task.key()} = train {train[key]}")
            if key in earlier:
                found.append(f"{split} {task.key()} = {split} {earlier[key]}")
            earlier.setdefault(key, task.key())
    return found


def _key(factory: EnvFactory, task: TaskSpec) -> str:
    key = factory.content_key(task)
    assert isinstance(key, str) and re.fullmatch(r"[0-9a-f]{16}", key), (task, key)
    return key


def _splits(factory: EnvFactory, sample: int | None = None) -> dict[str, list[TaskSpec]]:
    return {split: factory.tasks(split)[:sample] for split in ("train", *HELD_OUT)}


# ----- maze --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [dict(size=4, task="trail", distractors=0, num_train=64), dict(size=3, task="key")],
    ids=["trail-4x4-demo", "key-3x3"],
)
def test_maze_held_out_is_unseen_by_content(kwargs):
    """Every held-out maze (num_valid of each held-out split) against every train maze: no copy, no repeat."""
    factory = MazeFactory(**kwargs)
    splits = _splits(factory)
    assert [len(splits[s]) for s in HELD_OUT] == [factory.num_valid] * 2
    assert overlaps(factory, splits) == []


def test_maze_refuses_a_grid_with_too_few_mazes():
    """A 2x2 grid has only 8 distinct `reach` mazes: 64 train tasks leave none unseen for valid_seen."""
    factory = MazeFactory(size=2, task="reach", distractors=0, num_train=64)
    assert len({factory.content_key(t) for t in factory.tasks("train")}) == 8
    with pytest.raises(ValueError, match=r"size 2\b.*2x2 grid has too few distinct mazes"):
        factory.tasks("valid_seen")


def test_overlaps_reports_held_out_copies_of_train_content(monkeypatch):
    """The check can fail: held-out seeds drawn as the maze drew them before it compared contents (disjoint seed
    ranges, no content check) repeat train mazes on a 2x2 grid, and `overlaps` names each."""
    factory = MazeFactory(size=2, task="reach", distractors=0, num_train=64, num_valid=8)
    counts = {"train": factory.num_train, "valid_seen": factory.num_valid, "valid_unseen": factory.num_valid}
    monkeypatch.setattr(factory, "tasks", lambda split: factory._candidates(split, counts[split]))
    splits = _splits(factory)
    assert not {t.key() for t in splits["train"]} & {t.key() for t in splits["valid_seen"]}  # disjoint by seed
    found = overlaps(factory, splits)
    assert len([f for f in found if f.startswith("valid_seen") and "= train" in f]) == 8, found
    assert any(re.fullmatch(r"valid_seen maze\|reach\|2\|1000\d\d = valid_seen .*", f) for f in found), found
    # a train task listed again in a held-out split is found too
    factory = MazeFactory(size=3, task="key")
    train = factory.tasks("train")[:4]
    copied = {"train": train, "valid_seen": factory.tasks("valid_seen")[:4], "valid_unseen": [train[2]]}
    assert overlaps(factory, copied) == [f"valid_unseen {train[2].key()} = train {train[2].key()}"]


# ----- TextWorldExpress --------------------------------------------------------------------------------------------
COIN_5 = {"game": "coin", "game_params": "numLocations=5,includeDoors=0"}  # recipes/cpu/twx_coin_epo.yaml
COIN_11 = {"game": "coin", "game_params": "numLocations=11,includeDoors=1"}  # twx_coin_long, the paper recipe
COOKING = {"game": "cookingworld", "game_params": "numLocations=3,numIngredients=2,numDistractorItems=0"}


@needs_java
@pytest.mark.parametrize("kwargs", [COIN_5, COIN_11, COOKING], ids=["coin-5", "coin-11-doors", "cookingworld"])
def test_textworld_express_held_out_is_unseen_by_content(kwargs):
    """The CPU recipes' whole splits (64 train, 32 valid_seen, 32 valid_unseen games; a key is one reset and a walk
    of the map, ~15 ms): the games the recipes train and evaluate on, so no sample is needed. Coin Collector with 5
    rooms is where the package's folds repeat train games (see the next test); the others have room to spare (1,000
    train and 128 of each held-out fold of coin-11 were checked once: no repeat)."""
    pytest.importorskip("textworld_express")
    from epo_trl.envs.textworld_express import TextWorldExpressFactory

    factory = TextWorldExpressFactory(**kwargs, num_train=64, num_valid=32)
    try:
        splits = _splits(factory)
        assert [len(splits[s]) for s in HELD_OUT] == [32, 32]
        assert overlaps(factory, splits) == []
        # the key is the game, not the JVM or the draw: a second factory gives the same keys
        other = TextWorldExpressFactory(**kwargs, num_train=1, num_valid=1)
        try:
            sample = splits["valid_seen"][:4]
            assert [other.content_key(t) for t in sample] == [factory.content_key(t) for t in sample]
        finally:
            other.close()
    finally:
        factory.close()


@needs_java
def test_textworld_express_skips_held_out_seeds_that_repeat_train_games(monkeypatch):
    """Coin Collector, 5 rooms, no doors (recipes/cpu/twx_coin_epo.yaml: 64 train, 32 valid): the package's dev fold
    has disjoint seeds, but 3 of its first 32 seeds build a train game (dev 10005 = train 6, 10013 = train 26, 10014 =
    train 2). The factory skips them; the first 32 test seeds repeat none. (Measured once: the default 256 train / 64
    valid repeat 19 train games in dev and 1 within it; 1,000 / 1,000 repeat 147 in dev and 299 in test, of 688
    distinct train games: 5 rooms make few maps.)"""
    pytest.importorskip("textworld_express")
    from epo_trl.envs.textworld_express import TextWorldExpressFactory

    factory = TextWorldExpressFactory(**COIN_5, num_train=64, num_valid=32)
    try:
        checked = _splits(factory)
        assert overlaps(factory, checked) == []
        with monkeypatch.context() as m:  # the folds' seeds as they come, without the content check
            m.setattr(TextWorldExpressFactory, "_unseen", lambda self, split, tasks: tasks[: self.num_valid])
            raw = _splits(TextWorldExpressFactory(**COIN_5, num_train=64, num_valid=32))
        found = overlaps(factory, raw)
        repeated = {int(f.split()[1].split("|")[2]) for f in found}
        assert found and all(f.startswith("valid_seen") for f in found), found
        assert repeated == {10005, 10013, 10014}, found  # the package's folds, as measured
        seen = [t.variation for t in checked["valid_seen"]]
        assert not repeated & set(seen) and len(seen) == 32
        kept = [t.variation for t in raw["valid_seen"] if t.variation not in repeated]
        assert seen[: len(kept)] == kept  # the fold's order, minus the repeats, topped up with the next seeds
        assert checked["valid_unseen"] == raw["valid_unseen"]
        assert factory.solve(checked["valid_seen"][0])[-1] == "take coin"  # the keys' walks leave the expert usable
        with monkeypatch.context() as m:  # a fold with no unseen game left is refused, not cut short
            m.setattr(TextWorldExpressFactory, "content_key", lambda self, task: "0" * 16)
            with pytest.raises(ValueError, match=r"only 0 of num_valid=2 games .* unseen in the 2 train tasks"):
                TextWorldExpressFactory(**COIN_5, num_train=2, num_valid=2).tasks("valid_seen")
    finally:
        factory.close()


# ----- ScienceWorld ------------------------------------------------------------------------------------------------
@needs_java
def test_scienceworld_held_out_is_unseen_by_content():
    """The first 32 tasks of each split (~0.1 s a key: one load without a gold path, the object tree). The splits
    interleave task types, so these are the first 1-2 train and test variations of each of the 20 seen types, and the
    first 3-4 test variations of each of the 10 held-out types. The key holds the task and its goal, so only
    variations of one type can share one; the sample checks the key and the splits' wiring, not every pair: all 2,512
    train, 1,270 valid_seen and 549 valid_unseen tasks were checked once (~6 min): every key distinct, no repeat."""
    pytest.importorskip("scienceworld")
    from epo_trl.envs.scienceworld import ScienceWorldFactory

    factory = ScienceWorldFactory()
    try:
        splits = _splits(factory, 32)
        assert {factory.task_type(t) for t in splits["train"]} == set(factory.task_names)
        assert overlaps(factory, splits) == []
        # the key is the world's, not the JVM's: another simulator, loading in another order, gives the same keys
        # (the room text lists its objects in an order that depends on what was loaded before)
        sample = [t for s in splits.values() for t in s[:3]][::-1]
        other = ScienceWorldFactory()
        try:
            assert [other.content_key(t) for t in sample] == [factory.content_key(t) for t in sample]
        finally:
            other.close()
        # the keys load without a gold path in the expert's JVM; `solve` still gets one there
        task = next(t for t in splits["train"] if t.task == "find-living-thing")
        assert any(a.startswith("focus on") for a in factory.solve(task))  # a plan that wins (solve checks)
    finally:
        factory.close()


# ----- ALFWorld ----------------------------------------------------------------------------------------------------
def test_alfworld_held_out_is_unseen_by_content(alfworld_factory, alfworld_data):
    """Every game of the offline sample (2 train, 1 valid_seen, 1 valid_unseen; the downloaded games need GitHub):
    distinct by content, and the key is the game's, not the factory's (a fresh factory gives the same keys)."""
    from epo_trl.envs.alfworld.env import ALFWorldFactory

    splits = _splits(alfworld_factory)
    assert [len(splits[s]) for s in HELD_OUT] == [1, 1]
    assert overlaps(alfworld_factory, splits) == []
    fresh = ALFWorldFactory(data_path=alfworld_data)
    try:
        tasks = [t for s in splits.values() for t in s]
        keys = [fresh.content_key(t) for t in tasks]
        assert keys == [alfworld_factory.content_key(t) for t in tasks] and len(set(keys)) == len(tasks)
    finally:
        fresh.close()


def test_alfworld_overlaps_finds_a_train_game_copied_into_valid_seen(tmp_path):
    """A train game written again under valid_seen (another folder, the same game) is reported."""
    pytest.importorskip("alfworld")
    from epo_trl.envs.alfworld.env import ALFWorldFactory
    from epo_trl.envs.alfworld.games import SAMPLE_GAMES, write_sample_games

    copy = dataclasses.replace(SAMPLE_GAMES[0], split="valid_seen")
    write_sample_games(tmp_path, (*SAMPLE_GAMES, copy))
    factory = ALFWorldFactory(data_path=tmp_path)
    try:
        splits = _splits(factory)
        [train_copy] = [t for t in splits["train"] if t.task.endswith(copy.folder + "/trial_" + copy.trial)]
        [held_copy] = [t for t in splits["valid_seen"] if t.task.endswith(copy.folder + "/trial_" + copy.trial)]
        assert overlaps(factory, splits) == [f"valid_seen {held_copy.key()} = train {train_copy.key()}"]
    finally:
        factory.close()
