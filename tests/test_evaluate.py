"""`epo-trl eval`: the table and JSON must match the episodes actually played (scripted policies)."""

import json
import re

import pytest

from epo_trl.cli.evaluate import format_table, main
from epo_trl.envs import make_factory
from epo_trl.models.tiny import build_tokenizer
from epo_trl.rollout import CallableBackend, RolloutConfig
from epo_trl.rollout.evaluation import evaluate, pass_at_k

MAX_TURNS = 6


def last_admissible_policy(tokenizer):
    """Scripted stand-in for a model: always the last admissible action listed in the prompt."""

    def policy(prompts, max_new_tokens, temperature):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            listed = re.findall(r"admissible actions : (.*?) \.", text)[-1]
            action = listed.split(" , ")[-1]
            out.append(tokenizer(f"<action>{action}</action>")["input_ids"] + [tokenizer.eos_token_id])
        return out

    return policy


def simulate_last_admissible(factory, task):
    """The same policy played directly on the env, without the rollout engine: the expected outcome."""
    env = factory.make()
    env.reset(task)
    for turn in range(1, MAX_TURNS + 1):
        _, _, terminated, truncated, info = env.step(env.admissible_actions()[-1])
        if terminated or truncated:
            return bool(info.get("won")), turn
    return False, MAX_TURNS


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 3, 2) == 1.0


def test_eval_numbers_match_the_episodes_played():
    factory = make_factory("maze", size=2, task="reach", distractors=0)
    tokenizer = build_tokenizer(factory.vocabulary())
    tasks = factory.tasks("train")[:12]
    config = RolloutConfig(max_turns=MAX_TURNS, max_turn_tokens=32)
    backend = CallableBackend(last_admissible_policy(tokenizer))
    summary, records = evaluate(backend, factory, tasks, tokenizer, config, k=2, progress=False)

    expected = [simulate_last_admissible(factory, t) for t in tasks]
    wins = sum(w for w, _ in expected)
    assert 0 < wins < len(tasks), "pick tasks where the scripted policy both wins and loses"
    assert summary["episodes"] == 24 and summary["tasks"] == 12
    assert summary["success_rate"] == pytest.approx(wins / len(tasks))
    assert summary["mean_length"] == pytest.approx(sum(n for _, n in expected) / len(tasks))
    assert summary["mean_return"] == pytest.approx(10.0 * wins / len(tasks))  # no invalid turns
    assert summary["pass@2"] == pytest.approx(wins / len(tasks))  # deterministic: both samples agree
    assert set(summary["per_type"]) == {"reach"}
    table = format_table(summary)
    assert "pass@2 over 12 tasks" in table and f"{wins / len(tasks):.3f}" in table


def test_eval_cli_writes_json(tmp_path, capsys):
    from epo_trl.models.tiny import build_tiny_model

    factory = make_factory("maze", size=2, task="reach", distractors=0)
    model = build_tiny_model(str(tmp_path / "m"), extra_words=factory.vocabulary())
    out = tmp_path / "eval.json"
    rc = main(
        ["--model", model, "--env", "maze", "--env_kwargs", "{size: 2, task: reach, distractors: 0}", "--split", "train", "--limit", "3",
         "--k", "2", "--max_turns", "2", "--max_turn_tokens", "8", "--backend", "hf", "--output", str(out)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["summary"]["episodes"] == 6 == len(data["episodes"])
    won = sum(e["won"] for e in data["episodes"])
    assert data["summary"]["success_rate"] == pytest.approx(won / 6)
    assert data["complete"] is True
    assert "pass@2 over 3 tasks" in capsys.readouterr().out


def scripted_policy(factory, tokenizer):
    """`--policy test_evaluate:scripted_policy`: the last admissible action, as a generation backend."""
    return CallableBackend(last_admissible_policy(tokenizer))


def test_eval_streams_its_json_and_ctrl_c_keeps_finished_episodes(tmp_path, capsys, monkeypatch):
    """The JSON is rewritten after every batch; Ctrl-C during batch 2 keeps batch 1 and prints its table."""
    import epo_trl.rollout.evaluation as evaluate_module  # where `epo-trl eval` plays its batches
    from epo_trl.models.tiny import build_tiny_model

    factory = make_factory("maze", size=2, task="reach", distractors=0)
    model = build_tiny_model(str(tmp_path / "m"), extra_words=factory.vocabulary())
    out = tmp_path / "eval.json"
    real, seen_before_interrupt = evaluate_module.run_episodes, []

    def interrupted_on_second_batch(*args, **kwargs):
        if seen_before_interrupt or out.exists():
            seen_before_interrupt.append(json.loads(out.read_text()))
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "run_episodes", interrupted_on_second_batch)
    rc = main(
        ["--model", model, "--env_kwargs", "{size: 2, task: reach, distractors: 0}", "--split", "train", "--limit", "4", "--batch_size",
         "2", "--max_turns", str(MAX_TURNS), "--policy", "test_evaluate:scripted_policy", "--output", str(out)]
    )  # fmt: skip
    assert rc == 130
    streamed = seen_before_interrupt[0]  # written after batch 1, before the interrupt
    assert len(streamed["episodes"]) == 2 and streamed["complete"] is False
    data = json.loads(out.read_text())
    assert [e["task"] for e in data["episodes"]] == [t.key() for t in factory.tasks("train")[:2]]
    wins = sum(simulate_last_admissible(factory, t)[0] for t in factory.tasks("train")[:2])
    assert data["summary"]["episodes"] == 2 and data["summary"]["success_rate"] == pytest.approx(wins / 2)
    printed = capsys.readouterr().out
    assert "interrupted: 2 of 4 episodes finished" in printed and "pass@1 over 2 tasks" in printed


GOLD_TASKS = ("find-plant", "boil")  # the scripted policy knows these tasks' gold paths, not the third one


def gold_policy(factory, tokenizer):
    """Replays ScienceWorld's gold path for the tasks in GOLD_TASKS (read off the goal + step in the prompt)."""
    from epo_trl.envs import TaskSpec

    plans = {}
    for task in GOLD_TASKS:
        env = factory.make()
        try:
            _, info = env.reset(TaskSpec("scienceworld", task, 0))
            plans[info["goal"].strip().lower()] = env.gold_actions()
        finally:
            env.close()

    def policy(prompts, max_new_tokens, temperature):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            goal = re.search(r"your task is to : (.*?)\n", text).group(1).strip().lower()
            step = int(re.findall(r"you are now at step (\d+)", text)[-1])
            plan = plans.get(goal)
            action = plan[step - 1] if plan and step <= len(plan) else "wait"
            out.append(tokenizer(f"<action>{action}</action>")["input_ids"] + [tokenizer.eos_token_id])
        return out

    return CallableBackend(policy)


@pytest.mark.slow
def test_eval_cli_on_scienceworld_with_a_scripted_policy(tmp_path, capsys):
    """Gold paths through the adapter AND the rollout engine win with return 10; the unknown task loses."""
    import shutil

    if shutil.which("java") is None:
        pytest.skip("ScienceWorld needs Java")
    from epo_trl.models.tiny import build_tiny_model

    model = build_tiny_model(str(tmp_path / "m"))  # provides the (byte-level) tokenizer only
    out = tmp_path / "sw.json"
    kwargs = "{task_names: [find-plant, boil, melt], held_out_tasks: [], generate_gold_path: true}"
    rc = main(
        ["--model", model, "--env", "scienceworld", "--env_kwargs", kwargs, "--split", "train", "--limit", "3",
         "--max_turns", "45", "--max_turn_tokens", "64", "--policy", "test_evaluate:gold_policy",
         "--batch_size", "3", "--output", str(out)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    by_task = {e["task"].split("|")[1]: e for e in data["episodes"]}
    assert set(by_task) == {"find-plant", "boil", "melt"}
    for task in GOLD_TASKS:
        assert by_task[task]["won"] and by_task[task]["return"] == pytest.approx(10.0)
    assert not by_task["melt"]["won"]
    assert data["summary"]["success_rate"] == pytest.approx(2 / 3)
    assert data["summary"]["per_type"]["boil"]["success_rate"] == 1.0
    assert data["summary"]["per_type"]["melt"]["success_rate"] == 0.0
    assert "pass@1 over 3 tasks" in capsys.readouterr().out
