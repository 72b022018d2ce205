"""What a resume, an existing output folder or a recipe holds must match the command line, or `epo-trl train` says so
in one line (exit 2) before logs.jsonl is cut or the model is built (issue 34; docs/configuration.md, "Errors").

One real 2-step run (module fixture) is copied and damaged per test; the other cases need no training.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from epo_trl.cli import main
from epo_trl.cli.train import load_config
from epo_trl.trainers.checkpoints import checkpoint_problem, safetensors_problem, truncate_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAZE = os.path.join(ROOT, "recipes", "cpu", "maze_epo.yaml")
SMALL = ["--task_limit", "4", "--max_turns", "3", "--max_turn_tokens", "6", "--report_to", "none",
         "--disable_tqdm", "true", "--tiny_hidden_size", "16"]  # fmt: skip


def error_line(capsys, argv) -> str:
    """The error of `epo-trl ARGV`: exit 2, no traceback, one line (+ an indented fix); returns them joined."""
    capsys.readouterr()
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("epo-trl")) :]
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("  ")), lines
    return "\n".join(lines)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step EPO run with checkpoint-1 and checkpoint-2 (seed 0, tiny_hidden_size 16)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    argv = ["train", MAZE, *SMALL, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "1"]
    assert main([*argv, "--max_steps", "2"]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def train_argv(out, *extra):
    return ["train", MAZE, *SMALL, "--output_dir", str(out), *extra]


def resumed_from(out, *extra, notes=None):
    _, _, args = load_config(train_argv(out, "--resume_from_checkpoint", "true", *extra)[1:], notes)
    return args.resume_from_checkpoint


# --- 1. checkpoint completeness ------------------------------------------------------------------------------
def _truncate_half(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = [
    ("half-weights", lambda c: _truncate_half(c / "model.safetensors"), "model.safetensors is truncated or damaged"),
    ("weights-header-garbage", lambda c: (c / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"),
     "model.safetensors is damaged (its header is not JSON)"),
    ("no-optimizer", lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing: the optimizer (Adam) state"),
    ("half-optimizer", lambda c: _truncate_half(c / "optimizer.pt"), "optimizer.pt is truncated or damaged"),
    ("empty-scheduler", lambda c: (c / "scheduler.pt").write_bytes(b""), "scheduler.pt is empty: the learning-rate"),
    ("bad-config", lambda c: (c / "config.json").write_text('{"hidden'), "config.json is damaged"),
]  # fmt: skip


@pytest.mark.parametrize("damage, expected", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_resume_skips_a_damaged_checkpoint_and_refuses_it_explicitly(run, damage, expected, capsys):
    damage(run / "checkpoint-2")
    assert expected in checkpoint_problem(str(run / "checkpoint-2"))
    notes = []
    assert resumed_from(run, notes=notes) == str(run / "checkpoint-1")  # the previous, complete one
    assert notes[0].startswith(f"resume: skipping {run / 'checkpoint-2'}: ") and expected in notes[0]
    log = (run / "logs.jsonl").read_bytes()
    err = error_line(capsys, train_argv(run, "--resume_from_checkpoint", str(run / "checkpoint-2")))
    assert err.startswith(
        f"epo-trl train: error: resume_from_checkpoint={str(run / 'checkpoint-2')!r} is not a complete"
    )
    assert expected in err and "fix: pass another checkpoint-* folder" in err
    assert (run / "logs.jsonl").read_bytes() == log  # refused before the log was cut


def test_save_only_model_checkpoints_need_no_optimizer(run):
    for name in ("optimizer.pt", "scheduler.pt"):
        (run / "checkpoint-2" / name).unlink()
    assert resumed_from(run, "--save_only_model", "true") == str(run / "checkpoint-2")
    assert checkpoint_problem(str(run / "checkpoint-2"), needs_optimizer=False) is None


def test_safetensors_header_check(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(64), "b": torch.ones(3, 5)}, str(path))
    assert safetensors_problem(str(path)) is None
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])
    assert "truncated or damaged" in safetensors_problem(str(path))
    path.write_bytes(whole + b"\0")
    assert "truncated or damaged" in safetensors_problem(str(path))
    path.write_bytes(whole[:5])
    assert "is truncated (5 bytes)" in safetensors_problem(str(path))
    path.write_bytes(b"\xff" * 8 + whole[8:])
    assert "header says" in safetensors_problem(str(path))


# --- 2. resume mismatches --------------------------------------------------------------------------------------
def test_checkpoints_record_the_run(trained):
    state = json.loads((trained / "checkpoint-2" / "epo_state.json").read_text())
    assert state["run"] == {"algo": "epo", "seed": 0}
    assert json.loads((trained / "tiny-model" / "epo_trl_build.json").read_text()) == {
        "seed": 0,
        "model": "builtin-tiny",
    }


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--algo", "aepo"], "was written with --algo epo (epo_state.json), and this run has --algo aepo"),
        (["--algo", "grpo"], "was written with --algo epo (epo_state.json), and this run has --algo grpo"),
        (["--algo", "epo-base"], "was written with --algo epo (epo_state.json), and this run has --algo epo-base"),
        (["--seed", "3"], "was trained with seed=0, and this run has seed=3"),
    ],
    ids=["epo-as-aepo", "epo-as-grpo", "epo-as-epo-base", "other-seed"],
)
def test_a_resume_under_another_method_or_seed_is_one_line_and_keeps_the_log(run, extra, expected, capsys):
    log = (run / "logs.jsonl").read_bytes()
    err = error_line(capsys, train_argv(run, "--resume_from_checkpoint", "true", *extra))
    assert expected in err and str(run / "checkpoint-2") in err
    assert "fix: resume with --algo epo" in err or "fix: pass --seed 0 (the checkpoint's)" in err
    assert (run / "logs.jsonl").read_bytes() == log  # nothing cut, nothing built


def test_checkpoints_without_the_record_are_read_from_their_keys(run, capsys):
    for step in (1, 2):
        path = run / f"checkpoint-{step}" / "epo_state.json"
        state = json.loads(path.read_text())
        del state["run"]
        path.write_text(json.dumps(state))
    (run / "tiny-model" / "epo_trl_build.json").unlink()  # a folder from before the records: seeds unknown
    assert resumed_from(run, "--algo", "epo-base", "--seed", "5") == str(run / "checkpoint-2")  # accepted
    err = error_line(capsys, train_argv(run, "--resume_from_checkpoint", "true", "--algo", "aepo"))
    assert "was written with --algo epo (" in err


def test_a_grpo_checkpoint_resumes_under_grpo_only(run, capsys):
    """GRPO's state has no entropy_history: it used to count as incomplete, so `true` never found it."""
    for step in (1, 2):
        path = run / f"checkpoint-{step}" / "epo_state.json"
        path.write_text(json.dumps({"last_step_entropy": 1.0, "run": {"algo": "grpo", "seed": 0}}))
    assert resumed_from(run, "--algo", "grpo") == str(run / "checkpoint-2")
    err = error_line(capsys, train_argv(run, "--resume_from_checkpoint", "true"))
    assert "was written with --algo grpo (epo_state.json), and this run has --algo epo" in err


def test_a_checkpoint_of_another_model_size_is_one_line(run, capsys):
    # the run's tiny-model/ (hidden 16) is reused as is: another --tiny_hidden_size is refused
    err = error_line(capsys, train_argv(run, "--resume_from_checkpoint", "true", "--tiny_hidden_size", "32"))
    assert f"output_dir={str(run)!r} already holds tiny-model/ built with tiny_hidden_size=16" in err
    assert "this run asks for tiny_hidden_size=32" in err and "fix: pass --tiny_hidden_size 16" in err
    # without tiny-model/ (resuming into another folder): the checkpoint's config.json against the flags
    other = run.parent / "other"
    err = error_line(
        capsys, train_argv(other, "--resume_from_checkpoint", str(run / "checkpoint-2"), "--tiny_hidden_size", "32")
    )
    assert "holds a model with hidden_size=16, and this run's model differs (tiny_hidden_size=32)" in err
    assert "fix: pass --tiny_hidden_size 16 (the checkpoint's)" in err
    assert not other.exists()


def test_an_existing_tiny_model_is_not_silently_reused_with_other_flags(run, capsys):
    argv = train_argv(run, "--max_steps", "1")
    err = error_line(capsys, [*argv, "--tiny_hidden_size", "32", "--tiny_head_dim", "16"])
    assert "built with tiny_hidden_size=16, tiny_head_dim=8, and this run asks for tiny_hidden_size=32" in err
    err = error_line(capsys, [*argv, "--seed", "1"])
    assert "already holds tiny-model/ built with seed=0, and this run has seed=1" in err
    assert "fix: pass --seed 0, or a fresh --output_dir" in err
    assert (run / "logs.jsonl").exists()  # a refused new run does not clear the old run's log
    load_config(argv[1:])  # the same values: reused, no error


def test_an_existing_warm_start_of_another_model_is_not_silently_reused(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_model, out / "warm-start-model")
    (out / "warm-start-model" / "warm_start.json").write_text("{}")  # a finished warm start (written last)
    (out / "warm-start-model" / "epo_trl_build.json").write_text(json.dumps({"seed": 0, "model": "org/other"}))
    argv = train_argv(out, "--model_name_or_path", tiny_model, "--warmstart_steps", "5")
    err = error_line(capsys, argv)
    assert "already holds warm-start-model/, warm-started from model_name_or_path='org/other'" in err
    assert (
        f"this run has model_name_or_path={tiny_model!r}" in err and "fix: pass --model_name_or_path org/other" in err
    )
    (out / "warm-start-model" / "epo_trl_build.json").write_text(json.dumps({"seed": 0, "model": tiny_model}))
    load_config(argv[1:])  # the same model and seed: reused


# --- 3. values ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--learning_rate", "inf"], "learning_rate=inf is not a finite number."),
        (["--learning_rate", "nan"], "learning_rate=nan is not a finite number."),
        (["--learning_rate", "0"], "learning_rate=0 trains nothing: it must be > 0."),
        (["--max_grad_norm", "inf"], "max_grad_norm=inf is not a finite number."),
        (["--seed", "-1"], "seed=-1 is not a seed: it must be in [0, 4294967295]."),
        (["--data_seed", "4294967296"], "data_seed=4294967296 is not a seed"),
    ],
    ids=["lr-inf", "lr-nan", "lr-0", "grad-norm-inf", "seed-negative", "data-seed-too-big"],
)
def test_numbers_no_run_can_use(tmp_path, extra, expected, capsys):
    err = error_line(capsys, train_argv(tmp_path / "out", *extra))
    assert err.startswith("epo-trl train: error: ") and expected in err
    assert not (tmp_path / "out").exists()


def test_a_non_finite_number_in_a_recipe(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(Path(MAZE).read_text().replace("learning_rate: 5.0e-4", "learning_rate: .inf"))
    err = error_line(capsys, ["train", str(tmp_path / "r.yaml"), "--output_dir", str(tmp_path / "out")])
    assert "learning_rate=inf is not a finite number." in err


def test_the_library_config_refuses_an_infinite_learning_rate(tmp_path):
    from epo_trl import EPOConfig

    with pytest.raises(ValueError, match=r"Invalid learning_rate=inf: must be >= 0 and finite"):
        EPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, learning_rate=float("inf"))


def test_demo_refuses_a_negative_seed_before_building(tmp_path, capsys):
    err = error_line(capsys, ["demo", "--quick", "--seed", "-1", "--output-dir", str(tmp_path / "demo")])
    assert err.startswith("epo-trl demo: error: seed=-1 is not a seed")
    assert not (tmp_path / "demo").exists()


def test_a_model_folder_with_a_broken_config_is_one_line(tmp_path, tiny_model, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text('{"model_type": "qwen2", ')
    err = error_line(capsys, train_argv(tmp_path / "out", "--model_name_or_path", str(model)))
    assert f"model_name_or_path={str(model)!r}: {model / 'config.json'} is not valid JSON (JSONDecodeError" in err
    err = error_line(capsys, ["eval", "--model", str(model)])
    assert f"model={str(model)!r}: {model / 'config.json'} is not valid JSON" in err


def test_a_key_repeated_in_a_recipe_is_one_line(tmp_path, capsys):
    text = Path(MAZE).read_text() + "max_steps: 3\n"
    (tmp_path / "r.yaml").write_text(text)
    first = text.splitlines().index("max_steps: 20") + 1
    err = error_line(capsys, ["train", str(tmp_path / "r.yaml")])
    assert f"key 'max_steps' appears twice (first at line {first})" in err
    assert f"at line {len(text.splitlines())}, column 1" in err
    (tmp_path / "r.yaml").write_text(Path(MAZE).read_text().replace("{size: 2,", "{size: 2, size: 3,"))
    assert "key 'size' appears twice" in error_line(capsys, ["train", str(tmp_path / "r.yaml")])


# --- 4. logs -----------------------------------------------------------------------------------------------------
def test_truncate_log_drops_the_dead_runs_summary(tmp_path):
    rows = [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}, {"step": 2, "train_runtime": 6.1, "train_loss": 0.15},
            {"step": 3, "loss": 0.3}]  # fmt: skip
    log = tmp_path / "logs.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert truncate_log(str(log), 2) == 3
    assert [json.loads(line) for line in log.read_text().splitlines()] == rows[:2]


def test_a_resumed_run_logs_each_step_and_one_summary(run):
    """checkpoint-2's run finished (its summary row is at step 2); resumed to step 3, the log is the resumed run."""
    argv = train_argv(run, "--save_strategy", "steps", "--save_steps", "1", "--max_steps", "3")
    assert main([*argv, "--resume_from_checkpoint", "true"]) == 0
    rows = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "train_runtime" in r] == [3]


# --- 5. YAML-typed flags -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--report_to", "[tensorboard"], "report_to=[tensorboard is not valid YAML: expected ',' or ']'"),
        (["--lr_scheduler_kwargs", "{min_lr_rate: 0.1"], "lr_scheduler_kwargs={min_lr_rate: 0.1 is not valid YAML"),
        (
            ["--env_kwargs", "{size: 2, size: 3}"],
            "env_kwargs={size: 2, size: 3} is not valid YAML: key 'size' appears",
        ),
    ],
    ids=["list-flag", "dict-or-text-flag", "repeated-key-in-a-flag"],
)
def test_yaml_flags_are_one_line(tmp_path, extra, expected, capsys):
    err = error_line(capsys, train_argv(tmp_path / "out", *extra))
    assert expected in err and "fix: " in err


def test_a_dict_or_text_flag_takes_yaml(tmp_path):
    _, _, args = load_config([MAZE, "--output_dir", str(tmp_path), "--lr_scheduler_type", "cosine_with_min_lr",
                              "--lr_scheduler_kwargs", "{min_lr_rate: 0.1}"])  # fmt: skip
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
