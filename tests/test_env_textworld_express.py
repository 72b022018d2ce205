"""TextWorldExpress adapter on the real games (the package's JVM): gold paths win, invalid actions, folds, crash
recovery, threads and processes, and `epo-trl eval`."""

from __future__ import annotations

import json
import re
import shutil

import pytest

pytest.importorskip("textworld_express")
if shutil.which("java") is None:
    pytest.skip("TextWorldExpress needs Java", allow_module_level=True)

from envs_for_tests import admissible_picker  # noqa: E402

from epo_trl.envs import make_factory  # noqa: E402
from epo_trl.envs.textworld_express import TextWorldExpressCrashedError, TextWorldExpressFactory  # noqa: E402
from epo_trl.models.tiny import build_tokenizer, env_words  # noqa: E402
from epo_trl.rollout import CallableBackend, RolloutConfig, run_episodes  # noqa: E402

COIN = {"game": "coin", "game_params": "numLocations=11,includeDoors=1"}
COOKING = {"game": "cookingworld", "game_params": "numLocations=3,numIngredients=2,numDistractorItems=0"}


def play(factory, task, actions):
    env = factory.make()
    try:
        env.reset(task)
        for a in actions:
            _, reward, done, truncated, info = env.step(env.project_action(a))
        return done, info, reward
    finally:
        env.close()


@pytest.mark.parametrize("kwargs", [COIN, COOKING], ids=["coin", "cookingworld"])
def test_gold_paths_win_on_every_split(kwargs):
    factory = make_factory("textworld_express", **kwargs, num_train=3, num_valid=2)
    for split in ("train", "valid_seen", "valid_unseen"):
        for task in factory.tasks(split):
            plan = factory.solve(task)
            done, info, reward = play(factory, task, plan)
            assert done and info["won"] and info["score"] == 1.0, (task, plan)
    # and from a prefix of the gold path, the expert finishes it
    task = factory.tasks("train")[0]
    plan = factory.solve(task)
    assert factory.solve(task, plan[:2]) == plan[2:]
    with pytest.raises(ValueError, match="gold path"):
        factory.solve(task, ["inventory", "inventory"])


def test_folds_are_disjoint_seeded_splits():
    factory = TextWorldExpressFactory(**COIN, num_train=5, num_valid=4)
    splits = {s: factory.tasks(s) for s in ("train", "valid_seen", "valid_unseen")}
    assert [len(v) for v in splits.values()] == [5, 4, 4]
    assert {t.task for t in splits["train"]} == {"coin/train"} and {t.task for t in splits["valid_unseen"]} == {
        "coin/test"
    }
    seeds = [{t.variation for t in v} for v in splits.values()]
    assert not (seeds[0] & seeds[1] or seeds[0] & seeds[2] or seeds[1] & seeds[2])
    assert factory.task_type(splits["train"][0]) == "coin" and factory.task_types() == ["coin"]
    # same seed, same game: the first observation repeats
    env = factory.make()
    try:
        assert env.reset(splits["train"][1]) == env.reset(splits["train"][1])
        assert env.reset(splits["train"][1])[0] != env.reset(splits["train"][2])[0]
    finally:
        env.close()


def test_invalid_actions_bad_options_and_a_crash_restarts():
    with pytest.raises(ValueError, match="Unknown TextWorldExpress game 'zork'"):
        TextWorldExpressFactory(game="zork")
    with pytest.raises(ValueError, match="num_train=0 must be an integer >= 1"):
        TextWorldExpressFactory(num_train=0)
    with pytest.raises(ValueError, match="Unknown split 'dev'"):
        TextWorldExpressFactory().tasks("dev")
    factory = TextWorldExpressFactory(**COIN, num_train=1)
    task = factory.tasks()[0]
    env = factory.make()
    try:
        obs, info = env.reset(task)
        assert "coin" in info["goal"] and env.admissible_actions()
        assert env.project_action("   ") is None and env.project_action("  LOOK   around ") == "look around"
        reply, reward, done, truncated, _ = env.step(env.project_action("Fly to the MOON"))  # the game answers it
        assert "unknown action" in reply.lower() and reward == 0.0 and not done
        env._twx._gateway.java_process.kill()  # the JVM dies mid-episode
        env._twx._gateway.java_process.wait()
        with pytest.raises(TextWorldExpressCrashedError, match="look around"):
            env.step("look around")
        assert env.reset(task) == (obs, info)  # a fresh JVM, the same episode start
        with pytest.raises(RuntimeError, match="after the episode ended"):
            for command in factory.solve(task) + ["look around"]:
                env.step(command)
    finally:
        env.close()


def test_threads_and_processes_give_the_same_episodes():
    factory = TextWorldExpressFactory(**COIN, num_train=3)
    tokenizer = build_tokenizer(env_words(factory))
    tasks = factory.tasks("train") * 2
    records = {}
    for kind in ("threads", "processes"):
        config = RolloutConfig(max_turns=12, max_turn_tokens=24, num_workers=2, env_workers=kind,
                               require_tags=False)  # fmt: skip
        records[kind] = run_episodes(_picker(tokenizer), factory, tasks, tokenizer, config)
    assert records["threads"] == records["processes"]
    assert all(not r["failed"] for r in records["threads"]) and sum(len(r["turns"]) for r in records["threads"]) > 12


def _picker(tokenizer):
    """Takes the coin when it is offered, else an admissible action by a hash of the prompt."""
    inner = admissible_picker(tokenizer).fn

    def policy(prompts, n, t):
        out = []
        for ids, chosen in zip(prompts, inner(prompts, n, t), strict=True):
            listed = re.findall(r"admissible actions : (.*) \.", tokenizer.decode(ids))
            take = listed and "take coin" in listed[-1].split(" , ")
            out.append(tokenizer("<action> take coin </action>")["input_ids"] + [tokenizer.eos_token_id] if take
                       else chosen)  # fmt: skip
        return out

    return CallableBackend(policy)


def take_coin_policy(factory, tokenizer):
    return _picker(tokenizer)


def test_scripted_policies_score_exactly_what_they_play():
    """The rollout's logged metrics (`rollout/*`, what the trainer logs) on real games, for two policies whose outcome
    is known: the expert's gold path wins every task in exactly its length (success 1.0, return 10), and a policy that
    only looks around wins none and plays every episode to the turn limit (success 0.0, return 0)."""
    from contextlib import closing

    from epo_trl.rollout import RolloutEngine
    from epo_trl.rollout.engine import reduce_metrics, rollout_metrics

    factory = TextWorldExpressFactory(**COIN, num_train=2, num_valid=2)
    tokenizer = build_tokenizer(env_words(factory))
    tasks = factory.tasks("train") + factory.tasks("valid_unseen")
    plans = [factory.solve(t) for t in tasks]
    max_turns = max(len(p) for p in plans) + 2
    calls: list[int] = []
    eos = [tokenizer.eos_token_id]

    def say(action):
        return tokenizer(f"<action> {action} </action>", add_special_tokens=False)["input_ids"] + eos

    def expert(prompts, n, t):  # call k is turn k of the episodes still playing, in task order
        turn = len(calls)
        calls.append(len(prompts))
        playing = [p for p in plans if len(p) > turn]
        assert len(prompts) == len(playing)
        return [say(p[turn]) for p in playing]

    def look(prompts, n, t):
        return [say("look around")] * len(prompts)

    config = RolloutConfig(max_turns=max_turns, max_turn_tokens=32)
    metrics = {}
    for name, policy in (("expert", expert), ("look", look)):
        with closing(RolloutEngine(factory, tokenizer, config)) as engine:
            result = engine.run(tasks, CallableBackend(policy), "step")
        metrics[name] = reduce_metrics(rollout_metrics(result, config))
        if name == "expert":
            assert [[t.action for t in e.turns] for e in result.episodes] == plans
            assert all(e.won and e.truncated is None for e in result.episodes)
    assert calls == [sum(len(p) > k for p in plans) for k in range(max(len(p) for p in plans))]
    expert_m, look_m = metrics["expert"], metrics["look"]
    assert expert_m["rollout/success_rate"] == 1.0 and expert_m["rollout/mean_return"] == 10.0
    assert expert_m["rollout/episode_length"] == sum(len(p) for p in plans) / len(plans)
    assert expert_m["rollout/truncation_rate"] == 0.0 and expert_m["rollout/invalid_action_rate"] == 0.0
    assert look_m["rollout/success_rate"] == 0.0 and look_m["rollout/mean_return"] == 0.0
    assert look_m["rollout/episode_length"] == max_turns and look_m["rollout/truncation_rate"] == 1.0
    assert look_m["rollout/invalid_action_rate"] == 0.0 and look_m["rollout/env_failures"] == 0


def test_eval_cli_plays_coin_collector(tmp_path, capsys):
    from epo_trl.cli.evaluate import main
    from epo_trl.models.tiny import build_tiny_model

    model = build_tiny_model(str(tmp_path / "m"))  # provides the (byte-level) tokenizer only
    out = tmp_path / "twx.json"
    rc = main(["--model", model, "--env", "textworld_express", "--env_kwargs",
               "{game: coin, game_params: 'numLocations=5,includeDoors=0'}", "--split", "valid_unseen", "--limit", "4",
               "--max_turns", "30", "--max_turn_tokens", "32", "--policy", "test_env_textworld_express:take_coin_policy",
               "--batch_size", "4", "--output", str(out)])  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["episodes"]) == 4 and all(
        e["task"].startswith("textworld_express|coin/test|") for e in data["episodes"]
    )
    for e in data["episodes"]:  # a win is exactly an episode whose last action took the coin
        assert e["won"] == (e["turns"][-1]["action"] == "take coin")
    assert data["summary"]["success_rate"] > 0 and "coin" in data["summary"]["per_type"]
    assert "pass@1 over 4 tasks" in capsys.readouterr().out


def test_epo_trl_train_runs_the_cpu_recipe(tmp_path):
    """`epo-trl train recipes/cpu/twx_coin_epo.yaml` for 2 optimizer steps: real games in worker processes, the
    logged rollout metrics are those of 8 real episodes per step."""
    import os

    from epo_trl.cli import main

    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "cpu",
                          "twx_coin_epo.yaml")  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", recipe, "--max_steps", "2", "--max_turns", "8", "--output_dir", str(out)]) == 0
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["global_step"] == 2 and final["episodes_per_step"] == 8
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    steps = [e for e in logs if "loss" in e]
    assert len(steps) == 2
    for e in steps:  # what 8 episodes of at most 8 turns must log, whatever the tiny model plays
        assert e["rollout/env_failures"] == 0
        won = e["rollout/success_rate"] * 8
        assert won == pytest.approx(round(won))  # a whole number of the 8 episodes
        # Coin Collector cannot be lost: an episode wins, or plays all 8 turns (truncated)
        assert e["rollout/success_rate"] + e["rollout/truncation_rate"] == pytest.approx(1.0)
        if won == 0:
            assert e["rollout/episode_length"] == 8.0
        assert e["rollout/rows"] == pytest.approx(8 * e["rollout/episode_length"])  # step mode: one row per turn
        # return = 10 per win - 0.1 per invalid turn; the reward is that return
        invalid_per_episode = e["rollout/invalid_action_rate"] * e["rollout/episode_length"]
        mean_return = 10.0 * e["rollout/success_rate"] - 0.1 * invalid_per_episode
        assert e["rollout/mean_return"] == pytest.approx(mean_return, abs=1e-9)
        assert e["reward"] == pytest.approx(e["rollout/mean_return"], abs=1e-6)


def test_vocabulary_gives_a_tiny_tokenizer_one_token_per_word():
    """`vocabulary()` (the words of the gold-path plays) is what keeps a tiny model's prompts short: a held-out
    observation tokenizes to about one token per word, where the byte-level fallback needs several."""
    factory = TextWorldExpressFactory(**COIN, num_train=4, num_valid=4)
    words = factory.vocabulary()
    assert {"kitchen", "coin", "door", "north", "open"} <= set(words)
    env = factory.make()
    try:
        obs, _ = env.reset(factory.tasks("valid_unseen")[-1])  # a game whose words came from other games, too
    finally:
        env.close()
    n_words = len(re.findall(r"\w+|[^\w\s]", obs))
    with_words = len(build_tokenizer(env_words(factory))(obs)["input_ids"])
    bytes_only = len(build_tokenizer()(obs)["input_ids"])
    assert with_words <= 1.2 * n_words < bytes_only / 2, (with_words, n_words, bytes_only)


def test_brief_rooms_drops_the_furniture_and_keeps_the_game():
    """`brief_rooms`: a room keeps its first sentence, exits and the coin, by hand on Coin Collector's own wording;
    on the real game the gold path still wins with the shorter text, and other games refuse the option."""
    from epo_trl.envs.textworld_express import brief_room

    room = ("You are in the kitchen. In one part of the room you see a stove. There is also an oven. You also see a "
            "coin. \nThrough an open wood door, to the North you see the laundry room. To the West you see the "
            "corridor. ")  # fmt: skip
    assert brief_room(room) == ("You are in the kitchen. You also see a coin. Through an open wood door, to the North "
                                "you see the laundry room. To the West you see the corridor.")  # fmt: skip
    assert brief_room("You open the wood door, revealing the bathroom. ") == (
        "You open the wood door, revealing the bathroom."
    )
    full, brief = (TextWorldExpressFactory(**COIN, num_train=2, brief_rooms=b) for b in (False, True))
    task = full.tasks("train")[0]
    envs = [f.make() for f in (full, brief)]
    try:
        (obs_full, _), (obs_brief, _) = (e.reset(task) for e in envs)
    finally:
        for e in envs:
            e.close()
    assert obs_brief == brief_room(obs_full) and "In one part of the room" in obs_full
    assert "In one part of the room" not in obs_brief and len(obs_brief) < len(obs_full) / 2
    done, info, _ = play(brief, task, brief.solve(task))
    assert done and info["won"]
    with pytest.raises(ValueError, match="brief_rooms"):
        TextWorldExpressFactory(**COOKING, brief_rooms=True)


@pytest.mark.slow
def test_long_horizon_study_quick(tmp_path):
    """`python -m research.study --setting coin --quick`: the long-horizon study's path on real games, its warm start
    (gold paths, no noisy phase), step-mode runs from it, and a report with the collapse columns."""
    from research.study import main

    report = tmp_path / "long.md"
    assert main(["--setting", "coin", "--quick", "--jobs", "2", "--output-dir", str(tmp_path), "--report",
                 str(report)]) == 0  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]) == {"grpo", "epo"} and not results["errors"]
    (warm,) = results["warm_starts"].values()
    assert warm["mode"] == "step" and warm["warm_start"]["steps"] == 20 and warm["warm_start"]["noisy_steps"] == 0
    per_step = results["meta"]["setting"]["episodes_per_step"]
    for run in results["runs"]:
        assert run["mode"] == "step" and len(run["entropy"]) == 2 and run["before"] == warm["before"]
        assert all(h > 0 for h in run["entropy"])
        assert all(v * per_step == pytest.approx(round(v * per_step)) for v in run["success"])  # whole episodes
        # held-out success never beats the expert's ceiling on the same tasks and turn limit (--quick's 3 turns
        # leave no held-out game winnable: both are then exactly 0)
        for split, reference in results["baselines"].items():
            assert run["held_out"][split] <= reference["ceiling"] and run["before"][split] <= reference["ceiling"]
    text = report.read_text()
    assert text.startswith("# Study: GRPO vs EPO on long-horizon Coin Collector")
    assert "twx_coin_long.yaml" in text and "share of seeds collapsed" in text and "**Entropy collapse**" in text


def test_the_games_move_limit_truncates_and_a_win_terminates():
    """The game's `done` merges its move limit with the task's end: the adapter splits them. Past `env_step_limit`
    moves without an outcome is truncated (not terminated, not won), on the env and through the rollout's pool; the
    gold path's last step terminates."""
    factory = TextWorldExpressFactory(**COIN, num_train=1, env_step_limit=2)
    task = factory.tasks()[0]
    env = factory.make()
    try:
        env.reset(task)
        flags = []
        while not flags or not any(flags[-1]):
            flags.append(env.step("look around")[2:4])
        assert flags == [(False, False)] * (len(flags) - 1) + [(False, True)] and len(flags) == 3
        env.reset(task)
        plan = factory.solve(task)
        assert [env.step(env.project_action(a))[2:4] for a in plan[:2]] == [(False, False)] * 2  # within the limit
    finally:
        env.close()
    roomy = TextWorldExpressFactory(**COIN, num_train=1)
    assert play(roomy, task, roomy.solve(task))[:2] == (True, {"won": True, "score": 1.0})
    tokenizer = build_tokenizer(env_words(factory))
    look = tokenizer("<action> look around </action>", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    backend = CallableBackend(lambda prompts, n, t: [look] * len(prompts))
    [record] = run_episodes(backend, factory, [task], tokenizer, RolloutConfig(max_turns=6, max_turn_tokens=32))
    assert (record["terminated"], record["truncated"], record["won"], record["length"]) == (
        False,
        "env_limit",
        False,
        3,
    )
