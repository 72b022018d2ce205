"""Checkpoints that are complete or absent, and the logs that go with them.

A checkpoint folder is written in this order (EPOTrainer._save_checkpoint): `epo_state.json` (atomically), then
TRL's files (model, optimizer, scheduler, RNG), then `trainer_state.json` (atomically) and only after that TRL's
rotation of old checkpoints. So `trainer_state.json` parsing is the completeness marker: a crash at any point
leaves either a complete checkpoint or one without a valid `trainer_state.json`, which `checkpoint_problem`
reports and a resume never picks, and the previous checkpoint is still there (rotation had not run).

A file damaged after the fact (a copy cut short, a deleted optimizer) is caught too: `checkpoint_problem` checks what a
resume reads, cheaply (the safetensors header against the file's length, torch.save's zip directory at the file's
end), so a resume never restarts Adam and the LR schedule silently or dies in a traceback.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile

STATE_FILE = "epo_state.json"
TRAINER_STATE = "trainer_state.json"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
OPTIMIZER, SCHEDULER = "optimizer.pt", "scheduler.pt"  # transformers' OPTIMIZER_NAME, SCHEDULER_NAME
RUN = "run"  # epo_state.json's record of what the run is: {"algo": ..., "seed": ...} (checked on resume)
# The trainer class (`_name`) -> the `--algo` of `epo-trl train` that runs it (EPO: "epo-base" without smoothing).
ALGO_OF_TRAINER = {"MultiTurnGRPO": "grpo", "EPO": "epo", "AEPO": "aepo"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message names the file and the fix."""


def atomic_write_text(path: str, text: str) -> None:
    """Write then rename: a crash leaves the old file or the new one, never a truncated one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj))


def state_digest(state: dict) -> str:
    """A short digest of a trainer's checkpoint state (`state_for_checkpoint()`, or its `epo_state.json` read back):
    every rank of a run must hold the same state, so equal digests show they do (`epo-trl train`'s rank lines)."""
    import hashlib

    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def read_json(path: str, what: str) -> dict:
    """A JSON object from `path`, or a `CheckpointError` naming the file (missing, empty, truncated, not JSON)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {what}.")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0]}): {what}.") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is damaged (not a JSON object): {what}.")
    return value


def run_algo(trainer_name: str, smoothing: bool) -> str:
    """The `--algo` a trainer class (its `_name`) with this `smoothing` setting is (recorded in checkpoints)."""
    algo = ALGO_OF_TRAINER.get(trainer_name, trainer_name.lower())
    return "epo-base" if algo == "epo" and not smoothing else algo


def state_algo(state: dict) -> str | None:
    """The `--algo` an `epo_state.json` was written by: its record, or (checkpoints written before the record)
    read from its keys ("epo" then stands for epo or epo-base); None when it cannot tell."""
    recorded = state.get(RUN)
    if isinstance(recorded, dict) and isinstance(recorded.get("algo"), str):
        return recorded["algo"]
    if "aepo" in state:
        return "aepo"
    if "entropy_history" in state:
        return "epo"
    if "last_step_entropy" in state:
        return "grpo"
    return None


def safetensors_problem(path: str) -> str | None:
    """Why a .safetensors file cannot be loaded, from its header alone: the header must parse and the file must be
    exactly as long as the header's tensors say (a copy or a write cut short is shorter)."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{name} is truncated ({size} bytes)"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8 or length > 100_000_000:
                return f"{name} is truncated or damaged (its header says {length} header bytes, the file has {size})"
            header = json.loads(f.read(length))
    except OSError as e:
        return f"{name} cannot be read ({e.strerror or e})"
    except (ValueError, UnicodeDecodeError):
        return f"{name} is damaged (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{name} is damaged (its header is not a JSON object)"
    end = 0
    for key, entry in header.items():
        if key != "__metadata__":
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
                return f"{name} is damaged (tensor {key!r} has no data_offsets)"
            end = max(end, offsets[1])
    expected = 8 + length + end
    if size != expected:
        return f"{name} is truncated or damaged ({size} bytes, its header says {expected})"
    return None


def weights_problem(folder: str) -> str | None:
    """Why the model weights of a checkpoint cannot be loaded (None when they look whole)."""
    present = [name for name in _WEIGHTS if os.path.exists(os.path.join(folder, name))]
    if not present:
        return "no model weights"
    for name in present:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            problem = safetensors_problem(path)
        elif name.endswith(".index.json"):
            try:
                index = read_json(path, "the sharded weights cannot be found")
            except CheckpointError as e:
                return str(e)
            shards = sorted(set((index.get("weight_map") or {}).values()))
            problem = next((p for s in shards if (p := weights_file_problem(os.path.join(folder, s)))), None)
        else:
            problem = torch_file_problem(path)
        if problem:
            return problem
    return None


def weights_file_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return f"{os.path.basename(path)} is missing"
    return safetensors_problem(path) if path.endswith(".safetensors") else torch_file_problem(path)


def torch_file_problem(path: str) -> str | None:
    """Why a torch.save file is not whole: empty, or no zip directory at its end (torch.save writes a zip, whose
    directory comes last: a file cut short has none)."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        return f"{name} is missing"
    if os.path.getsize(path) == 0:
        return f"{name} is empty"
    try:
        whole = zipfile.is_zipfile(path)
    except OSError as e:
        return f"{name} cannot be read ({e.strerror or e})"
    return None if whole else f"{name} is truncated or damaged (not a whole torch.save file)"


def optimizer_problem(folder: str) -> str | None:
    """Why the optimizer and LR-scheduler state a resume restores is missing or damaged. Without them transformers
    resumes silently with a fresh Adam state and a restarted LR schedule. DeepSpeed keeps both in its own folders
    (`global_step*`, `latest`), FSDP the optimizer in `optimizer_0` / `optimizer.bin`: not checked here."""
    names = os.listdir(folder)
    if "latest" in names or any(n.startswith("global_step") for n in names):
        return None
    fsdp = any(n.startswith("optimizer") and n != OPTIMIZER for n in names)
    for name in (SCHEDULER,) if fsdp else (OPTIMIZER, SCHEDULER):
        problem = torch_file_problem(os.path.join(folder, name))
        if problem:
            what = "the optimizer (Adam) state" if name == OPTIMIZER else "the learning-rate schedule"
            return f"{problem}: {what} would restart from scratch"
    return None


def checkpoint_problem(
    folder: str,
    needs_epo_state: bool = True,
    state_keys: tuple[str, ...] | None = None,
    needs_optimizer: bool = True,
) -> str | None:
    """Why `folder` is not a complete checkpoint (None when it is). `state_keys`: the keys `epo_state.json` must
    hold (None: those of the method that wrote it); `needs_optimizer`: False for a run with `save_only_model`."""
    if not os.path.isdir(folder):
        return "no such folder"
    try:
        state = read_json(os.path.join(folder, TRAINER_STATE), "the checkpoint was not finished")
        if "global_step" not in state:
            return f"{TRAINER_STATE} has no global_step"
        if needs_epo_state:
            epo = read_json(os.path.join(folder, STATE_FILE), "EPO's entropy history was not saved")
            if state_keys is None:
                state_keys = {"epo": ("entropy_history",), "epo-base": ("entropy_history",), "aepo": ("aepo",)}.get(
                    state_algo(epo) or "epo", ()
                )
            missing = [k for k in state_keys if k not in epo]
            if missing:
                return f"{STATE_FILE} has no {', '.join(missing)}"
        if os.path.exists(os.path.join(folder, "config.json")):  # transformers reads it when resuming
            read_json(os.path.join(folder, "config.json"), "the model's configuration cannot be read")
    except CheckpointError as e:
        return str(e)
    problem = weights_problem(folder)
    if problem is None and needs_optimizer:
        problem = optimizer_problem(folder)
    return problem


def checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-N` folders of `output_dir`, newest (largest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def newest_complete(output_dir: str, **checks) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest complete checkpoint or None, [(newer incomplete checkpoint, why)] skipped on the way); `checks`:
    `checkpoint_problem`'s options."""
    skipped = []
    for folder in checkpoints(output_dir):
        problem = checkpoint_problem(folder, **checks)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def step_of(folder: str) -> int:
    return int(read_json(os.path.join(folder, TRAINER_STATE), "the checkpoint was not finished")["global_step"])


def is_summary_row(row: dict) -> bool:
    """The row transformers logs once at the end of `train()` (train_runtime, train_loss, ...): a run's summary,
    not a step. A resumed run's log keeps none of the dead run's (the resumed run logs its own at its end)."""
    return "train_runtime" in row


def truncate_log(path: str, step: int) -> int:
    """Keep only the rows of a `logs.jsonl` up to `step` (a resumed run re-logs the steps after it), without the
    summary rows of the runs that wrote it (`is_summary_row`: the dead run's "step N" summary would stay otherwise);
    returns the number of rows dropped. Unparseable rows (a line cut by a crash) are dropped too."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step and not is_summary_row(row):
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    atomic_write_text(path, "".join(kept))
    return dropped
