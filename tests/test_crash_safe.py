"""Crash-safe training state, driven through `epo-trl train` as a user runs it.

Crashes are injected deterministically (a fault raised inside TRL's checkpoint write, at the step chosen) instead
of racing a signal against the write; signals are sent to a real `epo-trl train` process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers.trainer as hf_trainer

from epo_trl.cli import main
from epo_trl.cli.train import load_config
from epo_trl.trainers.checkpoints import checkpoint_problem, newest_complete

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAZE = os.path.join(ROOT, "recipes", "cpu", "maze_epo.yaml")
SMALL = ["--task_limit", "4", "--max_turns", "3", "--max_turn_tokens", "6", "--report_to", "none",
         "--disable_tqdm", "true", "--tiny_hidden_size", "16"]  # fmt: skip


def train(out, *extra):
    return main(["train", MAZE, *SMALL, "--output_dir", str(out), "--save_strategy", "steps", *extra])


def logged_steps(out):
    return [json.loads(line)["step"] for line in Path(out / "logs.jsonl").read_text().splitlines() if '"loss"' in line]


class Crash(Exception):
    """Stands in for the process dying at this point (SIGKILL, power loss)."""


def crash_at_step(monkeypatch, step: int, where: str):
    """Raise `Crash` inside TRL's checkpoint write of `step`: in the optimizer save (mid-checkpoint) or in the
    rotation (after every file, where the old code wrote EPO's state)."""
    if where == "optimizer":
        original = hf_trainer.Trainer._save_optimizer_and_scheduler

        def fault(self, output_dir):
            if self.state.global_step == step:
                raise Crash(output_dir)
            return original(self, output_dir)

        monkeypatch.setattr(hf_trainer.Trainer, "_save_optimizer_and_scheduler", fault)
    else:
        original = hf_trainer.rotate_checkpoints

        def fault(output_dir, **kwargs):
            if os.path.isdir(os.path.join(output_dir, f"checkpoint-{step}")):
                raise Crash(output_dir)
            return original(output_dir=output_dir, **kwargs)

        monkeypatch.setattr(hf_trainer, "rotate_checkpoints", fault)


def test_crash_mid_checkpoint_leaves_the_previous_one_and_resume_skips_the_partial(tmp_path, monkeypatch):
    out = tmp_path / "run"
    crash_at_step(monkeypatch, 2, "optimizer")
    with pytest.raises(Crash):
        train(out, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "1")
    assert checkpoint_problem(str(out / "checkpoint-1")) is None  # rotation never ran: the good one is intact
    assert "trainer_state.json is missing" in checkpoint_problem(str(out / "checkpoint-2"))
    notes = []
    _, _, args = load_config([MAZE, *SMALL, "--output_dir", str(out), "--resume_from_checkpoint", "true"], notes)
    assert args.resume_from_checkpoint == str(out / "checkpoint-1")
    assert any(n.startswith(f"resume: skipping {out / 'checkpoint-2'}: ") for n in notes)
    monkeypatch.undo()
    assert train(out, "--max_steps", "3", "--save_steps", "1", "--resume_from_checkpoint", "true") == 0
    # the dead run's row for step 2 is gone: the log is the resumed trajectory, each step once
    assert logged_steps(out) == [1, 2, 3]


def test_crash_after_the_files_keeps_a_complete_checkpoint_with_epo_state(tmp_path, monkeypatch):
    """The old window: EPO state written after TRL's save and rotation. Now it is the first file written."""
    out = tmp_path / "run"
    crash_at_step(monkeypatch, 2, "rotation")
    with pytest.raises(Crash):
        train(out, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "1")
    assert checkpoint_problem(str(out / "checkpoint-2")) is None
    assert json.loads(Path(out / "checkpoint-2" / "epo_state.json").read_text())["entropy_history"]["num_steps"] == 2
    assert newest_complete(str(out))[0] == str(out / "checkpoint-2")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda ckpt: (ckpt / "trainer_state.json").unlink(), "trainer_state.json is missing"),
        (lambda ckpt: (ckpt / "trainer_state.json").write_text('{"global_st'), "trainer_state.json is damaged"),
        (lambda ckpt: (ckpt / "epo_state.json").write_text(""), "epo_state.json is damaged"),
        (lambda ckpt: (ckpt / "epo_state.json").write_bytes(b"\xff\xfe\x00garbage"), "epo_state.json is damaged"),
        (lambda ckpt: (ckpt / "epo_state.json").write_text("{}"), "epo_state.json has no entropy_history"),
        (lambda ckpt: (ckpt / "epo_state.json").unlink(), "epo_state.json is missing"),
    ],
    ids=[
        "no-trainer-state",
        "truncated-trainer-state",
        "empty-epo-state",
        "garbage-epo-state",
        "not-epo-state",
        "no-epo-state",
    ],  # fmt: skip
)
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, damage, expected, capsys):
    out = tmp_path / "run"
    assert train(out, "--max_steps", "2", "--save_steps", "1") == 0
    damage(out / "checkpoint-2")
    capsys.readouterr()
    rc = main(["train", MAZE, *SMALL, "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert err[0].startswith("epo-trl train: error: resume_from_checkpoint=") and expected in err[0]
    assert str(out / "checkpoint-2") in err[0]
    # `true` resumes from the newest complete one instead, and says which one it skipped
    notes = []
    _, _, args = load_config([MAZE, *SMALL, "--output_dir", str(out), "--resume_from_checkpoint", "true"], notes)
    assert args.resume_from_checkpoint == str(out / "checkpoint-1") and expected in notes[0]


def test_the_library_path_names_a_damaged_state_file(tmp_path, tiny_model):
    """EPOTrainer.train(resume_from_checkpoint=...) without the CLI: one clear error naming the file."""
    from helpers import length_reward, prompt_dataset, tiny_args

    from epo_trl import EPOConfig, EPOTrainer
    from epo_trl.trainers.checkpoints import CheckpointError

    args = tiny_args(EPOConfig, tmp_path, save_strategy="steps", save_steps=1, max_steps=1)
    EPOTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset()).train()
    (tmp_path / "checkpoint-1" / "epo_state.json").write_text('{"entropy_hist')
    args = tiny_args(EPOConfig, tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    trainer = EPOTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset())
    with pytest.raises(CheckpointError, match=r"checkpoint-1/epo_state.json is damaged \(JSONDecodeError"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_disk_full_is_one_line_and_earlier_checkpoints_stay(tmp_path, monkeypatch, capsys):
    import errno

    original = hf_trainer.Trainer._save_optimizer_and_scheduler

    def full(self, output_dir):
        if self.state.global_step == 2:
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return original(self, output_dir)

    monkeypatch.setattr(hf_trainer.Trainer, "_save_optimizer_and_scheduler", full)
    out = tmp_path / "run"
    rc = train(out, "--max_steps", "3", "--save_steps", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert err[-2].startswith("epo-trl train: error: disk full while writing to") and "at step 2" in err[-2]
    assert f"newest complete checkpoint: {out / 'checkpoint-1'}" in err[-1]
    assert checkpoint_problem(str(out / "checkpoint-1")) is None


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_the_step_end_saves_and_resumes(tmp_path, signum, code):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "epo_trl", "train", MAZE, *SMALL, "--output_dir", str(out), "--max_steps", "200"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "logs.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().count('"loss"') >= 2):  # a couple of steps in
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
    assert last.startswith(f"epo-trl train: interrupted by {name}: stopped after step ")
    step = int(last.split("stopped after step ")[1].split(";")[0])
    assert f"saved checkpoint-{step} in {out}" in last
    assert checkpoint_problem(str(out / f"checkpoint-{step}")) is None
    assert logged_steps(out) == list(range(1, step + 1))
    # and it resumes from there
    rc = main(["train", MAZE, *SMALL, "--output_dir", str(out), "--max_steps", str(step + 1),
               "--resume_from_checkpoint", "true"])  # fmt: skip
    assert rc == 0 and logged_steps(out) == list(range(1, step + 2))


def test_a_signal_before_any_step_is_not_a_traceback(tmp_path, capsys, monkeypatch):
    import epo_trl.cli.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "build_trainer", interrupted)
    rc = main(["train", MAZE, *SMALL, "--output_dir", str(tmp_path)])
    assert rc == 130 and capsys.readouterr().err.strip().splitlines()[-1] == "epo-trl train: interrupted (Ctrl-C)."
