"""A method is a folder + one line: the registry (epo_trl.trainers.registry) is what the CLI dispatches on.

tests/support/toy_method is a method outside the package; registered, `epo-trl train --algo toy` trains it with its
own config field, loss hook, named step sums and checkpoint state.
"""

import json
import os
from pathlib import Path

import pytest
from support.toy_method import METHODS as TOY_METHODS

from epo_trl.cli import main
from epo_trl.trainers import registry
from epo_trl.trainers.registry import Method, get_method, methods, register_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAZE = os.path.join(ROOT, "recipes", "cpu", "maze_epo.yaml")
SMALL = ["--task_limit", "4", "--max_turns", "3", "--max_turn_tokens", "6", "--report_to", "none",
         "--disable_tqdm", "true", "--tiny_hidden_size", "16"]  # fmt: skip


@pytest.fixture
def toy():
    (method,) = TOY_METHODS
    register_method(method)
    yield method
    registry._METHODS.pop(method.name)


def test_the_built_in_methods_are_registered_by_their_folders():
    from epo_trl.trainers.aepo import AEPOTrainer
    from epo_trl.trainers.epo import EPOConfig, EPOTrainer
    from epo_trl.trainers.grpo import MultiTurnGRPOTrainer

    assert list(methods())[:4] == ["grpo", "epo", "epo-base", "aepo"]
    assert get_method("grpo").trainer_class is MultiTurnGRPOTrainer
    assert get_method("aepo").trainer_class is AEPOTrainer
    assert get_method("epo-base").pins == {"smoothing": False}
    assert get_method("epo-base").trainer_class is EPOTrainer
    args = EPOConfig("out", smoothing=False, use_cpu=True, bf16=False)
    assert get_method("epo").entropy_band(args) is None
    assert get_method("grpo").describe(args) == []


def test_a_method_is_checked_when_declared(toy):
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("toy", get_method("grpo").config_class, get_method("grpo").trainer_class))
    with pytest.raises(ValueError, match="must subclass MultiTurnGRPOConfig"):
        Method("bad", dict, toy.trainer_class)
    with pytest.raises(ValueError, match=r"pins \['smoothing'\], which ToyConfig lacks"):
        Method("bad", toy.config_class, toy.trainer_class, pins={"smoothing": False})
    with pytest.raises(KeyError, match="registered: grpo, epo, epo-base, aepo, toy"):
        get_method("nope")


def test_a_registered_toy_method_trains_through_epo_trl_train(toy, tmp_path, capsys):
    out = tmp_path / "toy"
    rc = main(["train", MAZE, *SMALL, "--algo", "toy", "--toy_coef", "0.05", "--max_steps", "2",
               "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "algo toy |" in printed and "toy: toy_coef 0.05" in printed
    final = json.loads((out / "final_metrics.json").read_text())
    assert (final["algo"], final["global_step"]) == ("toy", 2)
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    steps = [entry["toy/steps"] for entry in logs if "toy/steps" in entry]
    assert steps == [1.0, 2.0]  # on_step_end ran once per optimizer step
    tokens = [entry["toy/tokens"] for entry in logs if "toy/tokens" in entry]
    assert len(tokens) == 2 and all(t >= 1 and t == int(t) for t in tokens)  # a named sum, reduced: whole tokens
    state = json.loads(next(out.glob("checkpoint-2/epo_state.json")).read_text())
    assert state["toy_steps"] == 2


def test_another_methods_field_names_that_method(toy, tmp_path, capsys):
    rc = main(["train", MAZE, *SMALL, "--algo", "epo", "--toy_coef", "0.05", "--output_dir", str(tmp_path / "x")])
    assert rc == 2
    assert "'toy_coef' (a field of toy: use --algo toy)" in capsys.readouterr().err
    rc = main(["train", MAZE, *SMALL, "--algo", "grpo", "--smoothing", "true", "--output_dir", str(tmp_path / "y")])
    assert rc == 2
    assert "'smoothing' (a field of epo, epo-base: use --algo epo)" in capsys.readouterr().err


def test_an_unknown_method_lists_the_registered_ones(tmp_path, capsys):
    rc = main(["train", MAZE, "--algo", "nope", "--output_dir", str(tmp_path / "z")])
    assert rc == 2
    assert "algo='nope' is not a registered method" in capsys.readouterr().err


def test_switching_a_recipes_method_drops_the_recipes_fields_of_the_other_method(tmp_path):
    from epo_trl.cli.train import load_config

    notes: list[str] = []
    script, _, args = load_config([MAZE, "--algo", "grpo", "--output_dir", str(tmp_path / "g")], notes)
    assert type(args) is get_method("grpo").config_class and args.entropy_coef == 0.0
    assert any("dropped the recipe's epo field(s) smoothing_coef, smoothing_kappa_low" in n for n in notes)
    assert any("--algo grpo sets entropy_coef=0.0 (the config file had 0.01)" in n for n in notes)
    assert not Path(tmp_path / "g").exists()


def test_the_method_folders_touch_no_private_trl_state_but_the_tokenizer():
    """EPO and AEPO use the base's services (sample_more, policy_logps, log_metric), not TRL's private state: the
    only private TRL attribute left in their folders is `_tokenizer` (declared in trl_surface.py)."""
    import re

    from trl import GRPOTrainer

    trainers = Path(ROOT) / "epo_trl" / "trainers"
    ours = set(re.findall(r"self\.(_\w+)\s*[:=]", (trainers / "grpo" / "grpo_trainer.py").read_text()))
    for folder in ("epo", "aepo"):
        text = "\n".join(p.read_text() for p in (trainers / folder).glob("*.py"))
        ours |= set(re.findall(r"self\.(_\w+)\s*[:=]", text))
        used = set(re.findall(r"self\.(_\w+)", text)) - ours
        trl_private = {name for name in used if hasattr(GRPOTrainer, name) or name in ("_tokenizer", "_metrics")}
        assert trl_private <= {"_tokenizer"}, (folder, trl_private)
        assert "_generate_and_score_completions" not in text, folder
