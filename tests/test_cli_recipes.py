"""`epo-trl train` as a user runs it: every shipped recipe through the CLI path, typed flags, algorithm presets,
global batch semantics, train / stop / resume, and the run folder's outputs."""

import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from epo_trl.cli.errors import UsageError
from epo_trl.cli.parser import ConfigParser, shared_fields
from epo_trl.cli.train import (
    ScriptArguments,
    config_parser,
    derive_batch,
    load_config,
    main,
)
from epo_trl.envs import make_factory
from epo_trl.rollout import RolloutConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True))
RUN_RECIPES = [r for r in RECIPES if os.sep + "accelerate" + os.sep not in r]
PAPER_RECIPES = [r for r in RUN_RECIPES if os.sep + "cpu" + os.sep not in r]
ACCELERATE = [r for r in RECIPES if os.sep + "accelerate" + os.sep in r]
CPU = ["--use_cpu", "true", "--bf16", "false", "--use_vllm", "false"]  # GPU recipes validated on this CPU machine
MAZE = os.path.join(ROOT, "recipes", "cpu", "maze_epo.yaml")


def test_recipes_are_found():
    assert len(RUN_RECIPES) >= 9 and len(PAPER_RECIPES) >= 5 and len(ACCELERATE) >= 5


def _owner_values(objs, key):
    """The value of `key` in the one config object whose class accepts it."""
    owners = [o for o in objs if key in {f.name for f in dataclasses.fields(o) if f.init}]
    assert len(owners) == 1, f"{key} is accepted by {[type(o).__name__ for o in owners]}"
    value = getattr(owners[0], key)
    return getattr(value, "value", value)  # TrainingArguments turns some strings into enums


@pytest.mark.parametrize("recipe", RUN_RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_recipe_routes_each_value_to_its_config(recipe, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # hub ids are validated offline elsewhere; nothing loads here
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    raw = yaml.safe_load(Path(recipe).read_text())
    script, rollout, args = load_config([recipe, *CPU, "--output_dir", str(tmp_path)])
    objs = (script, rollout, args)
    derived = {"tasks_per_step", "output_dir", "use_cpu", "bf16", "use_vllm"}
    for key, value in raw.items():
        if key in derived:
            continue
        got = _owner_values(objs, key)
        if isinstance(value, float) or isinstance(got, float):
            assert got == pytest.approx(float(value)), key
        elif isinstance(value, list) and isinstance(got, tuple):
            assert list(got) == value, key
        else:
            assert got == value, key
    # the values the paper recipes are about, where they must land
    episodes = args.per_device_train_batch_size * args.gradient_accumulation_steps  # 1 process here
    assert episodes == raw["tasks_per_step"] * raw["num_generations"]
    # the paper's 2 history pairs unless the recipe says otherwise (twx_coin_long: 1, for CPU-sized prompts)
    assert rollout.prompt_history_pairs == raw.get("prompt_history_pairs", 2)
    assert not hasattr(rollout, "temperature")  # the trainer's rules
    if script.algo == "grpo":  # the multi-turn base: no EPO field at all
        assert args.entropy_coef == 0.0 and type(args).__name__ == "MultiTurnGRPOConfig"
    if script.algo == "epo-base":
        assert args.smoothing is False and args.entropy_coef > 0
    if recipe in PAPER_RECIPES:
        long = "alfworld" in recipe or "textworld_express" in recipe  # the ALFWorld horizon
        assert episodes == 128 and args.num_generations == 8
        assert args.learning_rate == 5e-6 and args.lr_scheduler_kwargs == {"min_lr_rate": 0.2}
        assert rollout.max_turn_tokens == 512 and rollout.max_turns == (50 if long else 30)
        assert args.max_steps == (150 if long else 125)
        assert getattr(args, "entropy_history_window", None) is None  # released: cumulative reference
        if script.algo == "epo":
            assert (args.smoothing_kappa_low, args.smoothing_kappa_high) == (0.0, 2.0)
            assert args.entropy_coef == 0.001 and args.smoothing_coef == 0.1 and args.smoothing
        # every field line says where its value comes from: [R] released or [ours]
        for line in Path(recipe).read_text().splitlines():
            if line and not line.startswith((" ", "#", "output_dir", "env_kwargs")):
                assert "# [R]" in line or "# [ours]" in line, line


def test_paper_batch_is_global_on_any_world_size(monkeypatch):
    """16 tasks x 8 = 128 episodes per step on 1, 8 or 16 processes; 24 processes is refused with the fix."""
    for world, per_device in ((1, 128), (8, 16), (16, 8)):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        values = {"tasks_per_step": 16, "num_generations": 8, "gradient_accumulation_steps": 1,
                  "per_device_train_batch_size": 8}  # fmt: skip
        sources = {"tasks_per_step": "file", "per_device_train_batch_size": "default"}
        derive_batch(values, sources, [])
        assert values["per_device_train_batch_size"] == per_device
    monkeypatch.setenv("WORLD_SIZE", "24")
    with pytest.raises(UsageError, match=r"128 episodes per step cannot be split evenly over 24 processes") as e:
        derive_batch(values, sources, [])
    assert "16" in e.value.hint and "32" in e.value.hint


def test_batch_conflicts_and_precedence(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    values = {"tasks_per_step": 2, "num_generations": 4, "gradient_accumulation_steps": 1,
              "per_device_train_batch_size": 16}  # fmt: skip
    with pytest.raises(UsageError, match="both tasks_per_step=2 and per_device_train_batch_size=16"):
        derive_batch(dict(values), {"tasks_per_step": "file", "per_device_train_batch_size": "file"}, [])
    notes = []
    flag_wins = dict(values)
    derive_batch(flag_wins, {"tasks_per_step": "file", "per_device_train_batch_size": "flag"}, notes)
    assert flag_wins["per_device_train_batch_size"] == 16 and flag_wins["tasks_per_step"] is None and notes


@pytest.mark.parametrize("path", ACCELERATE, ids=os.path.basename)
def test_accelerate_configs_parse_with_accelerates_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(path)
    assert cfg.num_processes >= 1
    if "zero" in os.path.basename(path):
        assert cfg.distributed_type.value == "DEEPSPEED"
        assert cfg.deepspeed_config["zero_stage"] == (2 if "zero2" in path else 3)


def test_no_key_is_shared_by_two_configs():
    """Every key routes to exactly one config; a key two configs define cannot come back unnoticed."""
    from epo_trl.trainers.aepo.aepo_config import AEPOConfig

    for algo in ("epo", "aepo"):
        assert shared_fields(config_parser(algo).types) == {}
    assert shared_fields([ScriptArguments, RolloutConfig, AEPOConfig]) == {}

    @dataclasses.dataclass
    class A:
        lr: float = 1.0

    @dataclasses.dataclass
    class B:
        lr: float = 2.0

    with pytest.raises(UsageError, match=r"lr \(A and B\)"):
        ConfigParser([A, B], "prog")


def test_flags_are_typed_by_the_dataclass(tmp_path):
    script, rollout, args = load_config(
        ["--config", MAZE, "--output_dir", str(tmp_path), "--run_name", "no", "--save_strategy", "no",
         "--learning_rate", "1e-2", "--env_kwargs", "{size: 3, task: key}", "--report_to", "[]",
         "--action_tags", "<a>", "</a>", "--no_smoothing", "--task_limit", "5", "--require_tags=true"]
    )  # fmt: skip
    assert args.run_name == "no" and args.save_strategy.value == "no" and args.learning_rate == 0.01
    assert script.env_kwargs == {"size": 3, "task": "key"} and script.task_limit == 5
    assert args.report_to == [] and args.smoothing is False
    assert rollout.action_tags == ("<a>", "</a>") and rollout.require_tags is True


def test_yaml_values_keep_yaml_types_and_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1e-2\nuse_cpu: true\nbf16: false\nmax_steps: 7\nenv_kwargs: {size: 3}\n")
    script, _, args = load_config([str(recipe), "--output_dir", str(tmp_path), "--max_steps", "9"])
    assert args.learning_rate == 0.01 and args.max_steps == 9 and script.env_kwargs == {"size": 3}
    # `--config FILE` and the file as first argument are the same
    assert load_config(["--config", str(recipe), "--output_dir", str(tmp_path)])[2].max_steps == 7


def test_algo_preset_vs_explicit_values(tmp_path):
    out = ["--output_dir", str(tmp_path)]
    with pytest.raises(UsageError, match=r"algo=grpo pins entropy_coef=0.0, but entropy_coef=0.01 is set on the"):
        load_config([MAZE, "--algo", "grpo", "--entropy_coef", "0.01", *out])
    notes = []
    _, _, args = load_config([MAZE, "--algo", "grpo", *out], notes)  # the file's EPO values yield to --algo
    assert args.entropy_coef == 0.0 and type(args).__name__ == "MultiTurnGRPOConfig"
    assert notes == [  # the recipe's EPO-only keys go (grpo's config has none of them); the shared one yields
        "--algo grpo: dropped the recipe's epo field(s) smoothing_coef, smoothing_kappa_low, smoothing_kappa_high",
        "--algo grpo sets entropy_coef=0.0 (the config file had 0.01)",
    ]
    same_file = tmp_path / "r.yaml"
    same_file.write_text("algo: epo-base\nsmoothing: true\nuse_cpu: true\nbf16: false\n")
    with pytest.raises(UsageError, match="algo=epo-base pins smoothing=False, but smoothing=True is set in the"):
        load_config([str(same_file), *out])


def test_resume_from_checkpoint_is_checked_before_the_model_is_built(tmp_path):
    import torch

    out = tmp_path / "run"
    base = [MAZE, "--output_dir", str(out)]
    with pytest.raises(UsageError, match="is not a complete training checkpoint: no such folder"):
        load_config([*base, "--resume_from_checkpoint", str(tmp_path / "nope")])
    with pytest.raises(UsageError, match="no complete checkpoint-\\* folder in output_dir"):
        load_config([*base, "--resume_from_checkpoint", "true"])
    for step in (2, 10, 12):  # the files resume checks (tests/test_crash_safe.py damages each)
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "model.safetensors").write_bytes(b"\x02" + b"\x00" * 7 + b"{}")  # a whole file of no tensors
        for name in ("optimizer.pt", "scheduler.pt"):
            torch.save({}, folder / name)
        if step != 12:  # checkpoint-12 never got its EPO state: incomplete
            (folder / "epo_state.json").write_text(json.dumps({"entropy_history": {}}))
    notes = []
    assert load_config([*base, "--resume_from_checkpoint", "true"], notes)[2].resume_from_checkpoint == str(
        out / "checkpoint-10"
    )
    assert notes[0].startswith(
        f"resume: skipping {out / 'checkpoint-12'}: {out / 'checkpoint-12'}/epo_state.json is missing"
    )
    assert load_config([*base, "--resume_from_checkpoint", "false"])[2].resume_from_checkpoint is None
    assert not (out / "tiny-model").exists()


TIMING = ("time", "runtime", "per_second")
SMALL = ["--task_limit", "4", "--max_turns", "3", "--max_turn_tokens", "6", "--report_to", "none",
         "--disable_tqdm", "true", "--tiny_hidden_size", "16"]  # fmt: skip


def _logs(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _step_metrics(entry):
    return {k: v for k, v in entry.items() if not any(t in k for t in TIMING)}


def test_cli_stop_and_resume_continues_like_an_uninterrupted_run(tmp_path):
    """Train with save_steps, stop after checkpoint k=1 (the run's folder is cut back to it, as after a crash),
    resume from the CLI: the resumed run's first logged step is k+1 and its metrics equal the uninterrupted
    run's. (Before the fix the flag never reached `train()`: the run restarted at step 1.)"""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = [MAZE, *SMALL, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"]
    assert main([*args, "--output_dir", str(straight)]) == 0
    for name in ("checkpoint-1", "tiny-model"):
        shutil.copytree(straight / name, stopped / name)
    assert main([*args, "--output_dir", str(stopped), "--resume_from_checkpoint", "true"]) == 0

    resumed = [e for e in _logs(stopped / "logs.jsonl") if "loss" in e]
    reference = {e["step"]: e for e in _logs(straight / "logs.jsonl") if "loss" in e}
    assert [e["step"] for e in resumed] == [2] and sorted(reference) == [1, 2]
    got, want = _step_metrics(resumed[0]), _step_metrics(reference[2])
    assert set(got) == set(want) and "rollout/success_rate" in got and "epo/ref_entropy_mean" in got
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key

    final = json.loads(Path(straight / "final_metrics.json").read_text())
    assert final["global_step"] == 2 and final["episodes_per_step"] == 8 and final["algo"] == "epo"
    assert final["last"]["loss"] == pytest.approx(reference[2]["loss"])
    pytest.importorskip("matplotlib")
    assert set(final["plots"]) == {"success_rate.png", "return.png", "turn_entropy.png", "entropy_band.png"}
    for name in final["plots"]:
        assert (straight / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_warm_starts_the_builtin_model(tmp_path):
    """`--warmstart_steps` reaches the warm start through the CLI path (its fit is tested in test_warmstart.py):
    the run's tiny model is no longer the freshly built one."""
    import torch

    from epo_trl.models.tiny import build_tiny_model

    out = tmp_path / "run"
    rc = main([MAZE, *SMALL, "--max_steps", "1", "--output_dir", str(out), "--warmstart_steps", "5"])
    assert rc == 0
    factory = make_factory("maze", size=2, task="reach", distractors=0)
    fresh = build_tiny_model(str(tmp_path / "fresh"), extra_words=factory.vocabulary(), hidden_size=16)
    warm = AutoModelForCausalLM.from_pretrained(out / "tiny-model").state_dict()
    cold = AutoModelForCausalLM.from_pretrained(fresh).state_dict()
    assert warm.keys() == cold.keys()
    assert any(not torch.equal(warm[k], cold[k]) for k in cold)
    assert json.loads(Path(out / "final_metrics.json").read_text())["global_step"] == 1


def test_cli_warm_start_flags_reach_the_library_call_unchanged(tmp_path):
    """Both warm-start phases from the CLI (`make demo`'s recipe: expert, then the noisy demonstrator): the run's tiny
    model equals a direct `warm_start` call with the flags' values, bit for bit, and differs from the expert-only one."""
    import torch

    from epo_trl.models.tiny import build_tiny_model, env_words
    from epo_trl.models.warmstart import warm_start

    flags = ["--warmstart_steps", "4", "--warmstart_noisy_steps", "3", "--warmstart_noise", "0.5"]
    out = tmp_path / "run"
    assert main([MAZE, *SMALL, "--max_steps", "1", "--output_dir", str(out), *flags]) == 0
    script, rollout, _ = load_config([MAZE, *SMALL, *flags, "--output_dir", str(tmp_path / "unused")])
    factory = make_factory(script.env, **script.env_kwargs)
    tasks = factory.tasks(script.train_split)

    def direct(name, **phases):
        path = build_tiny_model(
            str(tmp_path / name), extra_words=env_words(factory), hidden_size=script.tiny_hidden_size
        )
        warm_start(path, factory, tasks, rollout, script.rollout_mode, steps=4, **phases)
        return AutoModelForCausalLM.from_pretrained(path).state_dict()

    cli = AutoModelForCausalLM.from_pretrained(out / "tiny-model").state_dict()
    both = direct("both", noisy_steps=3, noise=0.5)
    expert = direct("expert")
    assert all(torch.equal(cli[k], both[k]) for k in both)
    assert any(not torch.equal(cli[k], expert[k]) for k in expert)
    for bad, message in ((["--warmstart_noise", "0"], "warmstart_noise=0.0 must be in (0, 1]"),
                         (["--warmstart_noisy_steps", "-1"], "warmstart_noisy_steps=-1 must be >= 0")):  # fmt: skip
        with pytest.raises(UsageError, match=re.escape(message)):
            load_config([MAZE, *bad, "--output_dir", str(tmp_path / "unused")])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_cli_run_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    from scripts.epo_steps import free_port

    def launch(*extra: str) -> list[str]:  # each launch its own free port: the last one's may be in TIME_WAIT
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            free_port(), "-m", "epo_trl", "train", MAZE, "--output_dir", str(out), "--report_to", "none",
            "--task_limit", "16", "--save_strategy", "steps", "--save_steps", "2", *extra,
        ]  # fmt: skip

    first = subprocess.run(launch("--max_steps", "2"), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "8 episodes per optimizer step = 2 tasks x 4 generations = 2 process(es) x 4 episodes" in first.stdout
    ckpt = out / "checkpoint-2"
    history = json.loads(Path(ckpt / "epo_state.json").read_text())["entropy_history"]
    assert history["num_steps"] == 2
    second = subprocess.run(
        launch("--max_steps", "4", "--resume_from_checkpoint", "true"), capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-4000:]
    assert "terminate called" not in first.stderr + second.stderr  # no abort at exit (end_launched_process)
    assert f"resuming from {ckpt}" in second.stdout
    resumed = json.loads(Path(out / "checkpoint-4" / "epo_state.json").read_text())["entropy_history"]
    assert resumed["num_steps"] == 4  # continued from step 2's history, did not restart
    assert json.loads(Path(out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert [e["step"] for e in _logs(out / "logs.jsonl") if "loss" in e] == [1, 2, 3, 4]


def test_programs_pass_python_values_as_overrides(tmp_path):
    """`load_config(..., overrides=)` (bench/study): typed values count as flags, no string round trip."""
    notes = []
    script, _, args = load_config(
        [MAZE], notes, overrides={"save_strategy": "no", "report_to": [], "per_device_train_batch_size": 16,
                                  "env_kwargs": {"size": 3}, "output_dir": str(tmp_path)}
    )  # fmt: skip
    assert args.save_strategy.value == "no" and args.report_to == [] and script.env_kwargs == {"size": 3}
    assert args.per_device_train_batch_size == 16 and script.tasks_per_step is None
    assert notes == ["per_device_train_batch_size=16 replaces tasks_per_step"]
    with pytest.raises(UsageError, match="unknown key 'max_step' .*in the overrides"):
        load_config([MAZE], overrides={"max_step": 3})


def test_yaml_quoted_flag_values_are_unquoted(tmp_path):
    """Programs that YAML-dump their flag values (bench/common.recipe_config) quote YAML-ambiguous text."""
    _, _, args = load_config([MAZE, "--save_strategy", "'no'", "--run_name", '"yes"', "--output_dir", str(tmp_path)])
    assert args.save_strategy.value == "no" and args.run_name == "yes"
