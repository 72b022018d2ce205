"""recipes/slurm/train_multinode.sbatch, run by bash with stub `scontrol`, `srun` and `curl` (no cluster needed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "recipes" / "slurm" / "train_multinode.sbatch"

# Stubs log every call to $LOG. The server "loads" until the third /health poll; STUB_SERVER_DIES makes it crash,
# STUB_TRAINING_FAILS the training step (exit 3). `scontrol show node` gives the node's NodeAddr (STUB_NODE_ADDR,
# default 10.0.0.9), as Slurm prints it.
STUBS = {
    "scontrol": 'if [[ "$1 $2" == "show node" ]]; then echo "NodeName=$3 Arch=x86_64 CoresPerSocket=32"; '
    'echo "   NodeAddr=${STUB_NODE_ADDR:-10.0.0.9} NodeHostName=$3 Version=24.05"; '
    'else printf "train0\\ntrain1\\nvllm0\\n"; fi',
    "srun": 'echo "srun $*" >> "$LOG"\nif [[ "$*" == *vllm-serve* ]]; then [[ -n "${STUB_SERVER_DIES:-}" ]] && exit 1; '
    'exec sleep 60; fi\n[[ -z "${STUB_TRAINING_FAILS:-}" ]] || exit 3',
    # /health answers only once the server runs: its srun, in the background, has logged (not a race under load)
    "curl": 'echo "curl $*" >> "$LOG"\nuntil grep -q vllm-serve "$LOG"; do sleep 0.1; done\n'
    '(( $(grep -c "^curl" "$LOG") >= 3 ))',
    "python": f'exec "{sys.executable}" "$@"',
}


def run_sbatch(tmp_path, heads: int, kv_heads: int, mlp: int, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the script on a recipe whose model (a local config) has the given attention shape; return its log."""
    from transformers import Qwen2Config

    model = tmp_path / "model"
    Qwen2Config(
        hidden_size=128 * heads, num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=mlp
    ).save_pretrained(model)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {model}\nenv: maze\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    env = {
        **os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(log), "SLURM_JOB_NODELIST": "stub[0-2]",
        "VLLM_POLL_INTERVAL": "0", "HF_HUB_OFFLINE": "1", **env,
    }  # fmt: skip
    proc = subprocess.run(
        ["bash", str(SBATCH), str(recipe)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    return proc, [" ".join(line.split()) for line in log.read_text().splitlines()]  # one space between words


@pytest.mark.parametrize(
    "heads,kv_heads,mlp,tp,dp",
    [(16, 2, 11008, 8, 1), (28, 4, 18944, 4, 2)],  # Qwen2.5-3B, Qwen2.5-7B (TP 8 does not divide 28 heads)
    ids=["qwen2.5-3b", "qwen2.5-7b"],
)
def test_server_parallelism_fits_the_model_and_trainers_wait_for_health(tmp_path, heads, kv_heads, mlp, tp, dp):
    proc, log = run_sbatch(tmp_path, heads, kv_heads, mlp)
    assert proc.returncode == 0, proc.stderr
    (server,) = [line for line in log if "epo_trl vllm-serve" in line]  # logged in the background: order varies
    assert "--nodelist=vllm0" in server and f"--tensor_parallel_size {tp} --data_parallel_size {dp}" in server
    assert heads % tp == 0 and tp * dp == 8
    # trainers start only after /health answered (the third poll here)
    *_, train = [line for line in log if line != server]
    assert [line for line in log if line.startswith("curl")] == ["curl -sf http://10.0.0.9:8000/health"] * 3
    assert log.index(train) > max(i for i, line in enumerate(log) if line.startswith("curl"))
    assert "accelerate launch" in train and "--nodelist=train0,train1" in train
    assert "--num_processes 16" in train and "--vllm_server_host 10.0.0.9 --vllm_server_port 8000" in train


def test_parallelism_can_be_set_per_run(tmp_path):
    proc, log = run_sbatch(tmp_path, 28, 4, 18944, VLLM_TP="2")
    assert proc.returncode == 0, proc.stderr
    assert any("--tensor_parallel_size 2 --data_parallel_size 4" in line for line in log)


def test_no_training_when_the_server_dies(tmp_path):
    proc, log = run_sbatch(tmp_path, 28, 4, 18944, STUB_SERVER_DIES="1")
    assert proc.returncode != 0
    assert "vLLM server exited before it was healthy" in proc.stderr
    assert not any("accelerate launch" in line for line in log)


def test_a_failed_training_step_fails_the_job_with_a_message(tmp_path):
    """A rank that fails ends the step at once (--kill-on-bad-exit: srun would otherwise wait for the other nodes),
    and the job fails with its exit code and a line that says where (tests/test_slurm_real.py crashes a node)."""
    proc, log = run_sbatch(tmp_path, 16, 2, 11008, STUB_TRAINING_FAILS="1")
    assert proc.returncode == 3
    (train,) = [line for line in log if "accelerate launch" in line]
    assert train.startswith("srun --kill-on-bad-exit=1 ")
    assert (
        "Training failed (exit code 3) on train0,train1: a rank exited with an error or its node failed" in proc.stderr
    )


def test_server_binds_to_the_nodes_cluster_address_not_all_interfaces(tmp_path):
    """The keyless server listens on the vLLM node's Slurm NodeAddr (what the trainers and the health check reach),
    not 0.0.0.0; VLLM_HOST overrides it; a node that resolves to loopback stops the job before anything starts."""
    proc, log = run_sbatch(tmp_path, 16, 2, 11008)
    assert proc.returncode == 0, proc.stderr
    (server,) = [line for line in log if "epo_trl vllm-serve" in line]
    assert "--host 10.0.0.9 --port 8000" in server and "0.0.0.0" not in " ".join(log)
    assert "no API key" in proc.stdout

    (tmp_path / "override").mkdir()
    proc, log = run_sbatch(tmp_path / "override", 16, 2, 11008, VLLM_HOST="192.168.7.7")
    assert proc.returncode == 0, proc.stderr
    (server,) = [line for line in log if "epo_trl vllm-serve" in line]
    assert "--host 192.168.7.7 --port 8000" in server
    assert all("http://192.168.7.7:8000/health" in line for line in log if line.startswith("curl"))
    (train,) = [line for line in log if "accelerate launch" in line]
    assert "--vllm_server_host 192.168.7.7 --vllm_server_port 8000" in train

    (tmp_path / "loopback").mkdir()
    proc, log = run_sbatch(tmp_path / "loopback", 16, 2, 11008, STUB_NODE_ADDR="localhost")
    assert proc.returncode != 0 and "loopback address 127.0.0.1" in proc.stderr and "set VLLM_HOST" in proc.stderr
    assert not any(line.startswith("srun") for line in log)
