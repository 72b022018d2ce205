"""The GPU check (`make gpu-check`, research/bench/gpu_check.py) as far as a CPU machine can check it: it refuses
without CUDA, its time guard and process handling, one training run of its dry-run path, and `make bench` folding
its JSON into docs/benchmarks.md. The whole dry run (`python -m research.bench.gpu_check --dry-run`) takes minutes
on 2 shared cores, so it is documented (docs/benchmarks.md), not run here."""

import json
import os
import sys
import time

import pytest

from research.bench import gpu_check


def test_refuses_without_cuda_in_one_line(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    output = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpu-check: no CUDA GPU is visible (torch ")
    assert "fix: run it on a CUDA machine (make gpu-check), or add --dry-run" in err
    assert not output.exists()
    # a missing dependency: named, with the install, before anything runs
    monkeypatch.setattr(gpu_check, "_installed", lambda module: module != "trl")
    assert gpu_check.main(["--dry-run", "--output", str(output)]) == 2
    assert capsys.readouterr().err.startswith("gpu-check: trl not installed, which every part needs; fix: `make gpu")
    with pytest.raises(SystemExit):  # the first step is a warm-up: a run needs a step after it
        gpu_check.main(["--steps", "1"])


def test_time_guard_skips_every_part_and_still_writes_the_record(tmp_path, monkeypatch):
    """A budget below the model build's minimum: nothing starts, every part says why, the JSON is written."""
    output = tmp_path / "out" / "gpu_check.json"
    opts = gpu_check._parse(["--dry-run", "--budget-s", "5", "--parts", "epo_aepo", "zero2"])
    record = gpu_check.check(opts, tmp_path, output)
    assert json.loads(output.read_text()) == json.loads(json.dumps(record, default=str))
    assert record["model"] == {"status": "skipped", "reason": "time budget: 5 s is less than the model build's 30 s"}
    assert list(record["parts"]) == ["epo_aepo", "zero2"]  # --parts: only those, and zero2 is not skipped as CUDA-only
    for part in record["parts"].values():
        assert part == {"status": "skipped", "reason": "no model: its build was skipped (see model)"}
    assert record["measured"]["machine"]["cores"] == os.cpu_count() and record["dry_run"] is True
    assert record["measured"]["commit"] not in ("unknown", "") and " (given" not in record["measured"]["commit"]
    # a copy of the tree without .git (what a GPU machine may get): the commit given on the command line
    monkeypatch.setattr("research.bench.common.git_commit", lambda ignore: "unknown")
    opts = gpu_check._parse(["--dry-run", "--budget-s", "5", "--parts", "zero2", "--commit", "abc1234"])
    record = gpu_check.check(opts, tmp_path, output)
    assert record["measured"]["commit"] == "abc1234 (given: the tree had no git checkout)"


def test_a_part_out_of_time_is_killed_with_its_children(tmp_path):
    """run_logged kills the part's whole process tree at the deadline, a child in a session of its own too (torchrun
    starts each rank so, under accelerate launch)."""
    import psutil

    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    t0 = time.perf_counter()
    code = gpu_check.run_logged([sys.executable, "-c", script], dict(os.environ), tmp_path / "log", timeout=3)
    assert code is None and time.perf_counter() - t0 < 20
    assert (tmp_path / "log").read_text() == "started\n"
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 5
    while psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the part's child outlived the kill"
        time.sleep(0.1)
    assert (
        gpu_check.run_logged([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), tmp_path / "l", 30) == 3
    )


def test_a_failing_part_records_its_error(tmp_path, monkeypatch):
    def broken(work, dry_run, steps):
        raise RuntimeError("CUDA out of memory | tried to allocate 2 GiB")

    monkeypatch.setitem(gpu_check.CHILDREN, "zero2", broken)
    assert gpu_check.main(["--child", "zero2", "--work-dir", str(tmp_path), "--dry-run"]) == 0
    result = json.loads((tmp_path / "zero2.json").read_text())
    assert (
        result["status"] == "error" and result["error"] == "RuntimeError: CUDA out of memory | tried to allocate 2 GiB"
    )
    assert "in broken" in result["traceback"] and result["part_s"] >= 0


def test_dry_run_training_run(tmp_path):
    """The code of the epo_aepo, vllm_colocate and zero2 parts, in the dry run's form: the tiny model of the real
    layout (vocab padded beyond the tokenizer, tied), 2 EPO steps in trajectory mode through the CLI's own path."""
    model = gpu_check.build_model(tmp_path, dry_run=True, steps=2)
    assert model["status"] == "pass" and model["dtype"] == "float32" and model["gpu"] is None
    # tied embedding + final norm + 2 layers of (q with bias, k and v: 1 KV head of 32 with bias, o, MLP, 2 norms)
    layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert model["params"] == 4096 * 64 + 64 + 2 * layer == 336448
    run, trainer = gpu_check.train_run(tmp_path, True, 2, "epo", "trajectory", "epo-trajectory")
    assert run["status"] == "pass" and all(run["checks"].values()) and run["steps"] == 2
    assert len(run["step_s"]) == 2 and run["step_s_median"] == run["step_s"][1]
    assert run["peak_gpu_gib"] is None and run["gpu_gib_at_start"] is None  # no GPU
    assert run["rows_per_step"] == 8  # 2 tasks x 4 episodes, one row per episode
    moved, total = map(int, run["tensors_moved"].split("/"))
    assert moved == total == len(list(trainer.model.parameters()))
    assert [sorted(k for k in m if k.startswith("epo/")) for m in run["metrics"]] == [
        ["epo/beta", "epo/smooth_penalty"]
    ] * 2
    # random init over a 4096-token vocab: near-uniform, entropy close to ln 4096 = 8.32 nats
    assert all(8.0 < m["entropy"] <= 8.3178 for m in run["metrics"])


def _fixture() -> dict:
    """A hand-written gpu_check.json: one run failed a check, vLLM missing, ZeRO-2 out of time."""
    run = {
        "algo": "epo",
        "mode": "step",
        "steps": 3,
        "step_s": [9.5, 4.25, 4.75],
        "step_s_median": 4.5,
        "peak_gpu_gib": 31.2,
        "gpu_gib_at_start": 5.75,
        "tensors_moved": "338/338",
        "status": "pass",
        "metrics": [{"loss": 0.01, "entropy": 11.9}],
        "checks": {"3 optimizer steps": True},
    }
    failed = {
        **run,
        "algo": "aepo",
        "mode": "trajectory",
        "status": "fail",
        "metrics": [{"loss": float("nan")}],
        "checks": {"3 optimizer steps": True, "every loss finite": False},
    }
    overhead = {
        "vocab": 151936,
        "grpo_step_s": 0.2,
        "bonus_step_s": 0.3,
        "epo_step_s": 0.303,
        "ratio_vs_bonus_p25": 1.0,
        "ratio_vs_bonus_p75": 1.02,
        "epo_own_ms": 1.5,
        "epo_own_share": 0.005,
        "time_ratio": 1.515,
        "time_ratio_vs_bonus": 1.01,
        "grpo_peak_mb": 1000.0,
        "bonus_peak_mb": 1200.0,
        "epo_peak_mb": 1206.0,
        "memory_ratio_vs_bonus": 1.005,
        "memory_ratio": 1.206,
        "reps": 3,
        "device": "cuda",
    }
    machine = {
        "cpu": "Intel Xeon",
        "cores": 16,
        "torch_threads": 16,
        "ram_gib": 128.0,
        "cuda": "NVIDIA H100 80GB HBM3",
        "bf16_native": True,
    }
    software = {"python": "3.12.3", "torch": "2.13.0+cu130", "transformers": "5.17.0", "trl": "1.16.0", "vllm": None}
    return {
        "kind": "gpu_check", "dry_run": False, "budget_s": 540.0, "steps": 3, "total_s": 512.0,
        "measured": {"date": "2026-12-08T10:00:00+00:00", "run": "python -m research.bench.gpu_check",
                     "commit": "abc1234", "machine": machine, "software": software},
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "cuda": "13.0", "capability": "9.0", "count": 1},
        "model": {"status": "pass", "shape": gpu_check.QWEN25_15B_SHAPE, "params": 1543714304, "dtype": "bfloat16",
                  "tokenizer": "epo_trl.models.tiny.build_tokenizer (maze words), 598 tokens", "build_s": 21.0},
        "parts": {
            "epo_aepo": {"status": "fail", "seconds": 95.0, "runs": {"epo-step": run, "aepo-trajectory": failed}},
            "vllm_colocate": {"status": "error", "seconds": 40.0, "error": "ImportError: No module named 'vllm'"},
            "zero2": {"status": "skipped", "reason": "time budget: 20 s left of 540 s, the part needs >= 60 s"},
            "loss_overhead": {"status": "pass", "seconds": 80.0, "results": {"Qwen2.5-0.5B-shaped": overhead},
                              "targets": {"Qwen2.5-0.5B-shaped": {"time EPO / bonus <= 1.03": True}}},
        },
    }  # fmt: skip


def test_bench_folds_the_gpu_check_into_the_report(tmp_path):
    from research.bench.__main__ import main

    out = tmp_path / "benchmarks.md"
    machine = {"date": "2026-12-07T00:00:00+00:00", "cpu": "AMD EPYC", "cores": 2, "torch_threads": 1, "ram_gib": 23.5,
               "python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.17.0", "trl": "1.16.0", "vllm": None}  # fmt: skip
    raw = {"machine": machine, "command": "python -m research.bench", "total_s": 1.0, "section_s": {}, "results": {}}
    out.with_suffix(".json").write_text(json.dumps(raw))
    assert main(["--report-only", "--output", str(out)]) == 0
    before = out.read_text()
    assert "## GPU (device)\n\n**Not run yet**" in before and "    make gpu-check\n" in before

    (tmp_path / "gpu_check.json").write_text(json.dumps(_fixture()))
    assert main(["--report-only", "--output", str(out)]) == 0
    report = out.read_text()
    assert report.startswith(before.split("## GPU (device)")[0])  # the rest of the report is unchanged
    gpu = report.split("## GPU (device)\n\n", 1)[1]
    assert "Not run yet" not in gpu and "dry run" not in gpu.lower()
    assert gpu.startswith(
        "**Measured**: 2026-12-08T10:00:00+00:00 on Intel Xeon, 16 cores (torch threads 16), 128.0 GiB RAM, GPU: "
        "NVIDIA H100 80GB HBM3 (CPU bf16 native), commit abc1234; Python 3.12.3, torch 2.13.0+cu130, transformers "
        "5.17.0, trl 1.16.0; by `python -m research.bench.gpu_check`.\n"
    )
    assert "- GPU: NVIDIA H100 80GB HBM3 (79.2 GiB, compute capability 9.0), CUDA 13.0\n" in gpu
    assert (
        "random init, 1.54 B parameters saved in bfloat16 (hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP " in gpu
    )
    assert "8960, vocab 151936, tied embeddings)" in gpu and "budget 540 s, used 512 s; 3 optimizer steps" in gpu
    assert "| epo_aepo | **FAIL** | 95 | 1/2 runs pass: epo-step, aepo-trajectory |" in gpu
    assert "| vllm_colocate | **ERROR** | 40 | ImportError: No module named 'vllm' |" in gpu
    assert "| zero2 | skipped |  | time budget: 20 s left of 540 s, the part needs >= 60 s |" in gpu
    assert "| loss_overhead | pass | 80 | Qwen2.5-0.5B-shaped: time EPO / bonus <= 1.03 met |" in gpu
    assert "| epo-step | pass | 4.5 | 9.5 | 5.75 / 31.2 | 0.01 | 11.9 | 338/338 |  |" in gpu
    assert "| aepo-trajectory | **FAIL** | 4.5 | 9.5 | 5.75 / 31.2 | nan |  | 338/338 | every loss finite |" in gpu
    # section 1's table and verdict, for the CUDA model
    assert "| Qwen2.5-0.5B-shaped | 151936 | 0.2000 / 0.3000 / 0.3030 | **1.010** (1.000-1.020) |" in gpu
    assert "- Qwen2.5-0.5B-shaped: EPO vs GRPO + bonus: time +1.0% (met, target <= +3%), memory +0.5% (met" in gpu

    # a dry run says so; the vLLM part's probes and the ZeRO-2 part's setup get a line each
    dry = _fixture()
    run = dry["parts"]["epo_aepo"]["runs"]["epo-step"]
    vllm = {**run, "probe_diffs": [0.012, 0.0304], "tolerance": 0.25, "is_ratio_mean": 1.00042}
    zero = {**run, "distributed_type": "DistributedType.DEEPSPEED", "zero_stage": 2, "processes": 1}
    dry["parts"].update(vllm_colocate={"status": "pass", "seconds": 120.0, "runs": {"epo-step-vllm": vllm}},
                        zero2={"status": "pass", "seconds": 70.0, "runs": {"epo-step-zero2": zero}})  # fmt: skip
    (tmp_path / "gpu_check.json").write_text(json.dumps({**dry, "dry_run": True}))
    assert main(["--report-only", "--output", str(out)]) == 0
    report = out.read_text()
    assert "**A dry run on CPU with a tiny fp32 model (`--dry-run`): it shows the check works" in report
    assert "| vllm_colocate | pass | 120 | 1/1 runs pass: epo-step-vllm |" in report
    assert (
        "- vLLM colocate: probe mean |engine - trainer| log p after each push: 0.012, 0.0304 (tolerance 0.25); "
        "TRL's importance-sampling ratio, mean over steps: 1.0004\n" in report
    )
    assert "- ZeRO-2: DistributedType.DEEPSPEED, stage 2, 1 process(es)\n" in report
