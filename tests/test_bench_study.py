"""`make bench` and `make study` in reduced form, so their outputs (and the code paths behind them) cannot rot."""

import json
import math

import pytest


def _finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _bench(tmp_path, *sections):
    from research.bench.__main__ import main

    out = tmp_path / "bench.md"
    assert main(["--smoke", "--sections", *sections, "--output", str(out)]) == 0
    raw = json.loads(out.with_suffix(".json").read_text())
    report = out.read_text()
    assert "GPU (device)" in report and raw["machine"]["cores"] >= 1
    return raw["results"], report


def test_bench_rollout_and_turn_scaling(tmp_path):
    results, report = _bench(tmp_path, "rollout_efficiency", "turn_scaling")
    assert set(results["rollout_efficiency"]) == {"step", "trajectory"}
    for row in results["rollout_efficiency"].values():
        assert row["tokens"] > 0 and row["replay_matched_tokens"]
        assert _finite(row["ratio"], row["gen_s"], row["env_s"], row["prompt_s"], row["other_s"])
    for row in results["turn_scaling"].values():
        assert row["mode"] in ("step", "trajectory") and row["rows"] >= 1
        assert _finite(row["step_s"], row["rollout_s"], row["train_s"], row["gen_s"])
    assert "## 2. Rollout engine efficiency" in report and "## 4. Cost vs number of turns" in report


@pytest.mark.slow
def test_bench_loss_overhead_and_envs(tmp_path):
    results, report = _bench(tmp_path, "loss_overhead", "env_throughput")
    for row in results["loss_overhead"].values():
        assert _finite(
            row["time_ratio"],
            row["time_ratio_vs_bonus"],
            row["grpo_step_s"],
            row["bonus_step_s"],
            row["epo_step_s"],
            row["grpo_peak_mb"],
        )
    for env in ("scienceworld", "alfworld", "textworld_express"):
        rows = [r for r in results["env_throughput"][env].values() if isinstance(r, dict)]
        assert rows and all(_finite(r["steps_per_s"]) and r["steps_per_s"] > 0 for r in rows)
    resets = results["env_throughput"]["textworld_express_resets"]
    assert resets["envs"] == 4 and _finite(resets["fresh_s"], resets["reused_s"])
    assert "textworld_express resets, 4 envs" in report
    assert "## 1. Loss overhead" in report and "## 3. Environment throughput" in report


def test_bench_cli_device_option():
    from research.bench.__main__ import _parse, main

    opts = _parse(["--sections", "loss_overhead", "--device", "cuda"])
    assert opts.device == "cuda" and opts.sections == ["loss_overhead"]
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])  # cuda is for the loss-overhead section only


def test_study_quick(tmp_path):
    from research.study import STAT_COLUMNS, _mean_ci, main

    report = tmp_path / "study.md"
    assert main(["--quick", "--jobs", "1", "--output-dir", str(tmp_path), "--report", str(report)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]) == {"grpo", "aepo", "epo-step"} and not results["errors"]
    assert set(results["warm_starts"]) == {"trajectory-0", "step-0"}  # one warm start per seed and rollout mode
    for warm in results["warm_starts"].values():
        assert warm["warm_start"]["steps"] == 20 and warm["warm_start"]["noisy_steps"] == 10
        assert _finite(*warm["before"].values())
    modes = {run["algo"]: run["mode"] for run in results["runs"]}
    assert modes == {"grpo": "trajectory", "aepo": "trajectory", "epo-step": "step"}
    for run in results["runs"]:
        assert len(run["success"]) == len(run["entropy"]) == 2
        assert _finite(*run["entropy"], *run["success"], *run["held_out"].values()) and run["turn_entropy"]
        # every algorithm of a mode starts from the seed's shared warm start of that mode
        assert run["before"] == results["warm_starts"][f"{run['mode']}-0"]["before"]
    for stats in results["summary"].values():
        assert all(_finite(stats[k][0]) for k in STAT_COLUMNS if k != "collapse_step") and stats["seeds"] == 1
    for png in ("entropy.png", "success.png", "turn_entropy.png"):
        assert (tmp_path / png).stat().st_size > 1000
    text = report.read_text()
    assert "Does the baseline learn?" in text and "95%" in text
    # 95% CI half-width: t_{0.975, n-1} * s / sqrt(n)
    mean, half = _mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(half - 4.303 * 1.0 / 3**0.5) < 1e-9


def test_collapse_step_and_run_stats_by_hand():
    """Collapse = entropy below 0.1 x its step-1 value while train success is not up (the definition's cases:
    tests/test_study_stats.py): first such step, 1-based; the quarters by hand."""
    from research.study import collapse_step, run_stats

    assert collapse_step([1.0, 0.8, 0.09, 0.6], [0.5] * 4) == 3 and collapse_step([1.0, 0.5, 0.7], [0.5] * 3) is None
    run = {"entropy": [1.0, 0.8, 0.4, 0.45], "success": [0.0, 0.25, 0.5, 1.0],
           "before": {"valid_seen": 0.25, "valid_unseen": 0.0},
           "held_out": {"valid_seen": 0.75, "valid_unseen": 0.5}}  # fmt: skip
    stats = run_stats(run)
    assert stats["collapsed"] == 0.0 and math.isnan(stats["collapse_step"])
    assert stats["early_drop"] == pytest.approx(1.0 - 0.8) and stats["gain_seen"] == 0.5 and stats["gain_reached"]
    assert stats["initial_train_success"] == 0.0 and stats["final_train_success"] == 1.0
    assert stats["late_entropy_std"] == pytest.approx(0.025) and stats["late_change_std"] == 0.0
    flat = run_stats({**run, "entropy": [1.0, 0.8, 0.05, 0.05], "success": [0.5, 0.5, 0.5, 0.5]})
    assert flat["collapsed"] == 1.0 and flat["collapse_step"] == 3.0  # deterministic without learning


@pytest.mark.slow
def test_bench_vllm_cpu(tmp_path):
    """In a subprocess: the section builds a vLLM engine in-process (torch.distributed and its port stay set up)."""
    import subprocess
    import sys

    pytest.importorskip("vllm", reason="real vLLM not installed (make test installs vllm-cpu)")
    out = tmp_path / "bench.md"
    cmd = [sys.executable, "-m", "research.bench", "--smoke", "--sections", "vllm_cpu", "--output", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.with_suffix(".json").read_text())["results"]["vllm_cpu"]["rows"]
    assert _finite(row["step_engine_ratio"], row["trajectory_engine_ratio"], row["hf_tps"], row["hf_kv_tps"])
    assert 0 < row["push_s"] < 60 and row["probe_diff"] <= 0.02  # the pushed, perturbed weights are the engine's
    assert "## 5. Real vLLM on CPU" in out.read_text()


def test_bench_tool_race_plays_identical_episodes(tmp_path):
    """The race's loops play the same episodes: ours `turns` generate calls, TRL's one more (the stop); every action
    token count follows from the forced texts' lengths."""
    results, report = _bench(tmp_path, "tool_race")
    rows = {r["loop"]: r for r in results["tool_race"]["rows"]}
    assert set(rows) == {"ours: step", "ours: trajectory", "TRL tool loop"}
    episodes, turns = rows["TRL tool loop"]["episodes"], rows["TRL tool loop"]["turns"]
    action = rows["ours: step"]["forced_lengths"]["action"]  # token lengths of the forced texts
    call, stop = (rows["TRL tool loop"]["forced_lengths"][k] for k in ("call", "stop"))
    for loop in ("ours: step", "ours: trajectory"):
        assert rows[loop]["calls"] == turns and rows[loop]["action_tokens"] == episodes * turns * action
    assert rows["TRL tool loop"]["calls"] == turns + 1
    assert rows["TRL tool loop"]["action_tokens"] == episodes * (turns * call + stop)
    assert all(_finite(r["wall_s"], r["tok_s"], r["peak_rss_growth_mb"]) for r in rows.values())
    assert "## 6. Our lockstep engine vs TRL's tool-calling loop" in report


def _demo_metrics(algo: str, seed: int, before: float, after: float) -> dict:
    """The part of `epo-trl demo --llm`'s final_metrics.json that the SmolLM2 study reads."""
    split = lambda success, invalid: {"success_rate": success, "invalid_rate": invalid, "episodes": 64}  # noqa: E731
    return {
        "algo": algo, "seed": seed, "global_step": 12, "warm_start_seconds": 500.0, "train_seconds": 400.0,
        "total_seconds": 1000.0, "eval_zero_shot": {"valid_seen": split(0.0, 1.0)},
        "eval_before": {"valid_seen": split(before, 0.01), "valid_unseen": split(0.0, 0.02)},
        "eval_after": {"valid_seen": split(after, 0.0), "valid_unseen": split(0.0, 0.0)},
        "train_success_first_quarter": 0.4, "train_success_last_quarter": 0.9,
        "train_first_step": {"entropy": 0.1}, "train_last_step": {"entropy": 0.02}, "entropy_per_turn": {"0": 0.01},
    }  # fmt: skip


def test_smollm2_study_rows_and_intervals_by_hand():
    """results.json rows (before = after the warm start, after = after RL) and the mean ± 95% CI of the gains:
    gains 0.5, 0.3, 0.4 -> mean 0.4, s = 0.1, half-width t(0.975, 2) * s / sqrt(3) = 4.303 * 0.1 / 1.732 = 0.2484."""
    from research.study_llm import record, summarize, to_markdown

    runs = [record(_demo_metrics("epo", s, b, a)) for s, b, a in ((0, 0.4, 0.9), (1, 0.3, 0.6), (2, 0.5, 0.9))]
    runs.append(record(_demo_metrics("grpo", 0, 0.4, 0.5)))
    assert runs[0]["before"] == 0.4 and runs[0]["after"] == 0.9 and runs[0]["episodes"] == 64
    assert runs[0]["valid_actions"] == {"zero_shot": 0.0, "before": 0.99, "after": 1.0}
    summary = summarize(runs)
    assert list(summary) == ["grpo", "epo"]  # the baseline first
    mean, half = summary["epo"]["gain"]
    assert mean == pytest.approx(0.4) and half == pytest.approx(0.2484, abs=1e-4)
    assert summary["epo"]["gain_reached"] == 3 and summary["grpo"]["gain_reached"] == 0  # bar: +0.20
    results = {"model": "SmolLM2-135M-Instruct", "wall_s": 1.0, "command": "c", "date": "d", "machine": "m",
               "runs": runs, "errors": []}  # fmt: skip
    report = to_markdown(results, "smollm2")
    assert "| EPO (make demo-llm) | 3 | 0.400 ± 0.248 | 0.800 ± 0.430 | 0.400 ± 0.248 | 3/3 (0.29-1.00) |" in report
    assert "GRPO: held-out success 0.400 -> 0.500, gain 0.100 (one seed: no interval)" in report


def test_smollm2_study_margin_over_the_best_baseline(tmp_path):
    """The demo-llm bar: after RL >= 0.20 above both the warm start and the best policy that learns nothing (the
    walker here, 0.55 > random 0.05). Seed 0: gain +0.5, margin 0.9 - 0.55 = +0.35 (both met); seed 1: gain +0.3,
    margin +0.05 (not met); seed 2: gain +0.1 (not met) -> 1/3. The baselines come from the runs' final metrics."""
    from research.study_llm import margins, record, run_baselines

    reference = {"valid_seen": {"random": 0.05, "walker": 0.55, "expert": 1.0, "ceiling": 1.0}}
    (tmp_path / "epo-0.json").write_text(json.dumps({**_demo_metrics("epo", 0, 0.4, 0.9), "baselines": reference}))
    assert run_baselines(tmp_path) == (reference, 8)
    assert run_baselines(tmp_path / "none") == (None, None)
    runs = [record(_demo_metrics("epo", s, b, a)) for s, b, a in ((0, 0.4, 0.9), (1, 0.3, 0.6), (2, 0.5, 0.6))]
    (line,) = margins(runs, reference)
    assert "the walker at 0.550): 1/3 (0.01-0.91) runs reach both" in line
    assert (
        "seed 0: gain +0.500, over the walker +0.350; " in line
        and "seed 1: gain +0.300, over the walker +0.050" in line
    )
    assert margins(runs, None) == []


def _fake_bench(monkeypatch, committed: dict) -> dict:
    """The bench with every section's `run` replaced by the committed numbers (nothing is measured), a fixed machine
    and commit; returns the machine."""
    import importlib

    import research.bench.__main__ as bench

    info = {"date": "2030-01-02T03:04:05+00:00", "cpu": "Fake CPU", "cores": 8, "torch_threads": 8, "ram_gib": 64.0,
            "python": "3.11.7", "torch": "9.0", "transformers": "9.1", "trl": "9.2", "vllm": "9.3", "cuda": None,
            "bf16_native": True}  # fmt: skip
    monkeypatch.setattr(bench, "machine_info", lambda: info)
    monkeypatch.setattr(bench, "git_commit", lambda ignore=(): "abc1234+dirty")
    monkeypatch.setattr(bench, "setup_offline", lambda: None)
    for name in bench.SECTIONS:
        module = importlib.import_module(f"research.bench.{name}")
        monkeypatch.setattr(module, "run", lambda name=name, **kwargs: committed["results"][name])
    return info


def test_bench_update_keeps_other_sections_measured_records(tmp_path, monkeypatch):
    """`--update` of one section writes a new `sections_measured` record for it and keeps the others' records as they
    were (the hand-added ones of the committed .json included); the report has one Measured line per section, right
    under its heading. Nothing is measured: the sections return the committed numbers."""
    from pathlib import Path

    from research.bench.__main__ import SECTIONS, main

    committed = json.loads((Path(__file__).parents[1] / "docs" / "benchmarks.json").read_text())
    _fake_bench(monkeypatch, committed)
    out = tmp_path / "bench.md"
    out.with_suffix(".json").write_text(json.dumps(committed))
    assert main(["--sections", "tool_race", "--update", "--output", str(out)]) == 0
    raw = json.loads(out.with_suffix(".json").read_text())
    measured = raw["sections_measured"]
    new = measured.pop("tool_race")
    assert new["date"] == new["date"][:19] + "+00:00" and new["commit"] == "abc1234+dirty"
    assert new["run"] == f"python -m research.bench --sections tool_race --update --output {out}"
    assert new["machine"] == {"cpu": "Fake CPU", "cores": 8, "torch_threads": 8, "ram_gib": 64.0, "cuda": None,
                              "bf16_native": True}  # fmt: skip
    assert new["software"] == {"python": "3.11.7", "torch": "9.0", "transformers": "9.1", "trl": "9.2", "vllm": "9.3"}
    old = {k: v for k, v in committed["sections_measured"].items() if k != "tool_race"}
    assert measured == old and "note" in measured  # the hand-added records and their note, unchanged
    assert raw["results"] == committed["results"] and raw["command"].endswith("; then " + new["run"])
    report = out.read_text()
    lines = report.splitlines()
    headings = [i for i, line in enumerate(lines) if line.startswith("## ") and "GPU (device)" not in line]
    assert len(headings) == len(SECTIONS) == sum(line.startswith("**Measured**") for line in lines)
    assert all(lines[i + 2].startswith("**Measured**") for i in headings)
    tool_race = next(lines[i + 2] for i in headings if lines[i].startswith("## 6."))
    assert tool_race == (f"**Measured**: {new['date']} on Fake CPU, 8 cores (torch threads 8), 64.0 GiB RAM, no GPU "
                         f"(bf16 native), commit abc1234+dirty; Python 3.11.7, torch 9.0, transformers 9.1, trl 9.2, "
                         f"vllm 9.3; by `{new['run']}`.")  # fmt: skip
    env = next(lines[i + 2] for i in headings if lines[i].startswith("## 3."))
    assert env.startswith("**Measured** (added by hand, not by the bench): date: 2026-12-04T02:19:53+00:00; ")
    # a re-run of every section replaces the last hand-added record: the note about them goes too
    assert main(["--update", "--output", str(out)]) == 0
    measured = json.loads(out.with_suffix(".json").read_text())["sections_measured"]
    assert list(measured) == list(SECTIONS) and all(r["commit"] == "abc1234+dirty" for r in measured.values())
    assert "hand-added" not in out.read_text() and "added by hand" not in out.read_text()


def test_bench_report_only_renders_the_json(tmp_path, capsys):
    """--report-only measures nothing and rewrites the report from the .json: the same report the run wrote."""
    from pathlib import Path

    from research.bench.__main__ import SECTIONS, main, render_raw

    committed = json.loads((Path(__file__).parents[1] / "docs" / "benchmarks.json").read_text())
    out = tmp_path / "bench.md"
    out.with_suffix(".json").write_text(json.dumps(committed))
    assert main(["--report-only", "--output", str(out)]) == 0
    assert out.read_text() == render_raw(committed) and out.read_text().count("\n**Measured**") == len(SECTIONS)
    assert json.loads(out.with_suffix(".json").read_text()) == committed  # the numbers are left alone
    with pytest.raises(SystemExit):
        main(["--report-only", "--output", str(tmp_path / "none.md")])


def test_git_commit_short_hash_dirty_unknown(tmp_path):
    """The commit of the checkout holding the package, "+dirty" with changes to tracked files (except the ignored
    ones), "unknown" where the package is not at a checkout's top level, or without git."""
    import re
    import subprocess

    from research.bench.common import git_commit

    repo, package = tmp_path / "repo", tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (repo / "report.md").write_text("a")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    commit = git_commit(package)
    assert re.fullmatch(r"[0-9a-f]{4,40}", commit)
    (repo / "report.md").write_text("b")
    assert git_commit(package) == commit + "+dirty" and git_commit(package, ignore=[repo / "report.md"]) == commit
    (repo / "untracked.txt").write_text("")  # not part of the code until added
    assert git_commit(package, ignore=[repo / "report.md"]) == commit
    assert git_commit(repo / "elsewhere") == "unknown"  # the package is not at the top level of this checkout
    (tmp_path / "plain").mkdir()
    assert git_commit(tmp_path / "plain" / "pkg") == "unknown"  # no checkout at all
