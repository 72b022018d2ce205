"""A run's life outside the training loop, as a user meets it (issue 34): stopped while its model is built, two runs
in one folder, a full disk. Each case is one line and a documented exit code, and nothing half-done is kept.

Signals go to real `epo-trl train` / `epo-trl demo` processes; the full disk is a real one (a small tmpfs) where this
machine lets tests mount one, else safetensors' and torch's own full-disk errors are raised in their place.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import child_env

from epo_trl.cli import main
from epo_trl.cli.lifecycle import Interrupted, interrupted_line, is_disk_full, phase
from epo_trl.cli.runlock import LOCK_FILE, lock_output_dir, release_all
from epo_trl.models.atomic import build_atomically

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAZE = os.path.join(ROOT, "recipes", "cpu", "maze_epo.yaml")
SMALL = ["--task_limit", "4", "--max_turns", "3", "--max_turn_tokens", "6", "--report_to", "none",
         "--disable_tqdm", "true", "--tiny_hidden_size", "16"]  # fmt: skip
# safetensors' error on a full disk (read off a real full tmpfs): a SafetensorError, not an OSError
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"  # torch.save's, idem
BUILD_STOPPED = "the unfinished model was discarded, and the next run builds it again."
FEW_TASKS = ["--env_kwargs", "{size: 2, task: reach, distractors: 0, num_train: 8}"]  # a short warm start


class Built(Exception):
    """Stops a run right after its model is built."""


def start(*args: str) -> tuple[subprocess.Popen, queue.Queue, Path]:
    """`python -m epo_trl ARGS` with stdout read line by line (into the returned queue) and stderr to a file."""
    err = Path(os.environ.get("TMPDIR", "/tmp")) / f"epo-trl-{os.getpid()}-{time.monotonic_ns()}.err"
    env = child_env(PYTHONUNBUFFERED="1")  # not a rank of an engine an earlier test built in this process
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "epo_trl", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=f, text=True)  # fmt: skip
    lines: queue.Queue = queue.Queue()

    def read():
        with proc.stdout:
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines, err


def wait_for_line(proc, lines: queue.Queue, err: Path, prefix: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        assert line is not None, f"exited {proc.wait()} before {prefix!r}:\n{err.read_text()[-3000:]}"
        if line.startswith(prefix):
            return line
    proc.kill()
    raise AssertionError(f"no line {prefix!r} in {timeout} s:\n{err.read_text()[-3000:]}")


def stop(proc, err: Path, signum=signal.SIGTERM) -> tuple[int, list[str]]:
    proc.send_signal(signum)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    text = err.read_text()
    err.unlink()
    assert "Traceback" not in text, text[-3000:]
    return code, text.strip().splitlines()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name) if folder.exists() else []


# --- 1 + 2: a stop during the model build keeps nothing half-built, says so in one line, exits 143 ---------------


def test_sigterm_during_the_warm_start_keeps_no_half_built_model_and_the_next_run_rebuilds_it(
    tmp_path, capsys, monkeypatch
):
    import epo_trl.cli.train as train_module

    out = tmp_path / "run"
    proc, lines, err = start("train", MAZE, *SMALL, *FEW_TASKS, "--output_dir", str(out), "--max_steps", "1",
                             "--warmstart_steps", "2", "--warmstart_noisy_steps", "100000",
                             "--warmstart_noise", "0.5")  # fmt: skip
    # the expert phase is done, the long noisy phase is under way: the model exists only as the temporary folder
    wait_for_line(proc, lines, err, "epo-trl train: warm start: 100000 steps on the noisy demonstrator")
    assert leftovers(out) == [f"tiny-model.tmp-{proc.pid}"]
    code, stderr = stop(proc, err)
    assert code == 143
    assert stderr[-1] == (
        f"epo-trl train: interrupted by SIGTERM while building and warm-starting the tiny model in "
        f"{out / 'tiny-model'}: {BUILD_STOPPED}"
    )
    assert not (out / "tiny-model").exists() and leftovers(out) == []
    # A SIGKILLed build leaves its temporary folder, and an older version left config.json without warm start:
    # the next run removes the first and builds over the second, warm start included.
    (out / "tiny-model.tmp-999999").mkdir()
    (out / "tiny-model").mkdir()
    (out / "tiny-model" / "config.json").write_text("{}")
    capsys.readouterr()
    real, built = train_module.resolve_model, []

    def resolve_model(*args, **kwargs):  # the real build, then stop: the RL steps after it are not the point here
        built.append(real(*args, **kwargs))
        raise Built

    monkeypatch.setattr(train_module, "resolve_model", resolve_model)
    with pytest.raises(Built):
        main(["train", MAZE, *SMALL, *FEW_TASKS, "--output_dir", str(out), "--max_steps", "1",
              "--warmstart_steps", "2"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert built == [str(out / "tiny-model")]
    rebuilt = f"epo-trl train: {out / 'tiny-model'}: unfinished (stopped during an earlier build): building it again"
    assert rebuilt in stdout
    assert "epo-trl train: warm start: 2 expert cloning steps, loss " in stdout
    assert json.loads((out / "tiny-model" / "warm_start.json").read_text())["steps"] == 2
    assert (out / "tiny-model" / "model.safetensors").exists() and leftovers(out) == []


def test_sigterm_during_the_demo_warm_start_is_one_line_and_exit_143(tmp_path):
    out = tmp_path / "demo"
    proc, lines, err = start("demo", "--quick", "--output-dir", str(out), "--warmstart-steps", "2",
                             "--warmstart-noisy-steps", "100000")  # fmt: skip
    wait_for_line(proc, lines, err, "warm start: 100000 steps on the noisy demonstrator")
    code, stderr = stop(proc, err)
    assert code == 143
    assert stderr[-1] == (
        f"epo-trl demo: interrupted by SIGTERM while building and warm-starting the tiny model in "
        f"{out / 'tiny-model'}: {BUILD_STOPPED}"
    )
    assert not (out / "tiny-model").exists() and leftovers(out) == []


@pytest.mark.parametrize(
    "signum, code, name",
    [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C (SIGINT)")],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_during_the_demos_rl_run_names_it_and_what_is_kept(
    tmp_path, monkeypatch, capsys, request, signum, code, name
):
    """The demo trains without `StopOnSignal`: a signal there ends the command with the same one line."""
    import epo_trl.cli.train as train_module

    if signal.getsignal(signum) is signal.SIG_IGN:
        # a suite launched in the background without job control (`nohup make test &`) inherits SIGINT ignored, and
        # the command rightly keeps an ignored signal ignored: give this test the terminal's default back
        signal.signal(signum, signal.default_int_handler)
        request.addfinalizer(lambda: signal.signal(signum, signal.SIG_IGN))

    def signalled(trainer, **kwargs):
        os.kill(os.getpid(), signum)  # a real signal to this process, through the command's handler
        time.sleep(5)
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(train_module, "train_and_close", signalled)
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--output-dir", str(out), "--warmstart-steps", "2", "--warmstart-noisy-steps", "0",
               "--eval-tasks", "1"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code
    assert err[-1] == (
        f"epo-trl demo: interrupted by {name} while RL training (2 steps): the model {out / 'tiny-model'} is kept; "
        "the demo saves no checkpoint, so nothing of the RL run is."
    )
    assert json.loads((out / "tiny-model" / "warm_start.json").read_text())["steps"] == 2


def test_the_interrupt_line_names_the_innermost_phase():
    with pytest.raises(KeyboardInterrupt) as stopped:
        with phase("outer", "kept outer"), phase("inner", "kept inner"):
            raise Interrupted(signal.SIGTERM)
    assert interrupted_line(stopped.value) == "interrupted by SIGTERM while inner: kept inner."
    assert interrupted_line(KeyboardInterrupt()) == "interrupted (Ctrl-C)."


def test_a_build_that_raises_leaves_nothing_and_a_finished_one_appears_whole(tmp_path):
    path = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with build_atomically(str(path)) as tmp:
            Path(tmp, "config.json").write_text("{}")
            raise KeyboardInterrupt
    assert not path.exists() and leftovers(tmp_path) == []
    (tmp_path / "model.tmp-999999").mkdir()  # a killed build's (no such process)
    with build_atomically(str(path)) as tmp:
        Path(tmp, "config.json").write_text("{}")
        Path(tmp, "model.safetensors").write_text("w")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert leftovers(tmp_path) == []


# --- 3: two runs, one output_dir --------------------------------------------------------------------------------


def test_a_second_run_in_a_busy_output_dir_is_one_line_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "logs.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from epo_trl.cli.runlock import "
         "lock_output_dir; lock_output_dir(sys.argv[2]); print('locked', flush=True); sys.stdin.read()", ROOT,
         str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = main(["train", MAZE, *SMALL, "--output_dir", str(out), "--max_steps", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and "Traceback" not in "\n".join(err)
        assert err[-2] == (
            f"epo-trl train: error: output_dir={str(out)!r} is in use by another run (PID {holder.pid}): two runs in "
            "one folder would interleave logs.jsonl and overwrite each other's checkpoints."
        )
        fix = f"  fix: wait for that run to end (or stop it: kill {holder.pid}), or pass another --output_dir."
        assert err[-1] == fix
        # nothing of the first run's was touched
        assert (out / "logs.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n' and not (out / "tiny-model").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, no stale lock is left
        holder.communicate()
    lock_output_dir(str(out))
    release_all()


def test_train_holds_the_lock_while_it_runs(tmp_path, monkeypatch, capsys):
    """The lock is taken before the log is touched and the model built, and released when the command ends."""
    import fcntl

    import epo_trl.cli.train as train_module

    seen = {}

    def build(*args, **kwargs):
        fd = os.open(out / LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen["locked"] = False
        except BlockingIOError:
            seen["locked"] = True
        finally:
            os.close(fd)
        seen["holder"] = (out / LOCK_FILE).read_text().split()[0]
        seen["log"] = (out / "logs.jsonl").exists()
        raise train_module.UsageError("stop here")

    monkeypatch.setattr(train_module, "build_trainer", build)
    out = tmp_path / "run"
    out.mkdir()
    (out / "logs.jsonl").write_text("{}\n")
    assert main(["train", MAZE, *SMALL, "--output_dir", str(out)]) == 2
    assert seen == {"locked": True, "holder": str(os.getpid()), "log": False}
    lock_output_dir(str(out))  # released at the command's end
    release_all()


# --- 4: disk full -------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """`mount(size)` -> a folder on a real tmpfs of `size` bytes. Where mounting is not allowed, the folder is plain
    and safetensors' / torch's saves into it raise their real full-disk errors instead (and its free space reads 0)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = []

    def mount(size: int, fail: str = "safetensors") -> Path:
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                  capture_output=True).returncode == 0  # fmt: skip
        except OSError:  # no mount command
            done = False
        if done:
            mounted.append(folder)
            return folder
        import safetensors
        import torch
        import transformers.modeling_utils as modeling_utils

        inside = lambda path: str(path).startswith(str(folder))  # noqa: E731
        real_safe, real_torch = modeling_utils.safe_save_file, torch.save

        def safe_save_file(tensors, filename, *args, **kwargs):
            if inside(filename) and fail == "safetensors":
                raise safetensors.SafetensorError(SAFETENSORS_FULL)
            return real_safe(tensors, filename, *args, **kwargs)

        def torch_save(obj, f, *args, **kwargs):
            if inside(f) and fail == "torch":
                raise RuntimeError(TORCH_FULL)
            return real_torch(obj, f, *args, **kwargs)

        monkeypatch.setattr(modeling_utils, "safe_save_file", safe_save_file)
        monkeypatch.setattr(torch, "save", torch_save)
        import epo_trl.cli.lifecycle as lifecycle

        real_usage = lifecycle.shutil.disk_usage
        monkeypatch.setattr(lifecycle.shutil, "disk_usage",
                            lambda p: real_usage(p)._replace(free=0) if inside(p) else real_usage(p))  # fmt: skip
        return folder

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_while_building_the_model_is_one_line(small_disk, capsys):
    out = small_disk(32 * 1024) / "run"  # the tiny model's weights (52 kB) do not fit
    rc = main(["train", MAZE, *SMALL, "--output_dir", str(out), "--max_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert err[-2] == (
        f"epo-trl train: error: disk full while building the tiny model in {str(out / 'tiny-model')!r}: "
        f"{SAFETENSORS_FULL}"
    )
    assert err[-1] == f"  fix: free space and run again ({BUILD_STOPPED[:-1]}; nothing else was written there)."
    assert not (out / "tiny-model").exists() and leftovers(out) == []


@pytest.mark.parametrize(
    "size, writer, says",
    [(32 * 1024, "safetensors", SAFETENSORS_FULL), (128 * 1024, "torch", "unexpected pos ")],
    ids=["model-weights-safetensors", "optimizer-torch-save"],
)
def test_disk_full_while_saving_a_checkpoint_is_one_line(small_disk, tiny_model, capsys, size, writer, says):
    """The checkpoint's weights (safetensors: a SafetensorError) or its optimizer state (torch.save: a RuntimeError
    that does not say why) hit the full disk."""
    out = small_disk(size, writer) / "run"
    rc = main(["train", MAZE, *SMALL, "--output_dir", str(out), "--max_steps", "1", "--model_name_or_path", tiny_model,
               "--save_strategy", "steps", "--save_steps", "1"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert err[-2].startswith(f"epo-trl train: error: disk full while writing to {str(out)!r} at step 1: ")
    assert says in err[-2]
    fix = "  fix: free space and resume (--resume_from_checkpoint true); no complete checkpoint was written."
    assert err[-1] == fix


def test_disk_full_is_recognised_however_the_writer_reports_it(tmp_path):
    import safetensors

    assert is_disk_full(safetensors.SafetensorError(SAFETENSORS_FULL))
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_disk_full(RuntimeError(TORCH_FULL), str(tmp_path))  # a write error on a disk with room is a bug
    assert not is_disk_full(ValueError("bad value"), str(tmp_path))
