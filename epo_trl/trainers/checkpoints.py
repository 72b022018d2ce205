"""Checkpoints that are complete or absent, and the logs that go with them.

A checkpoint folder is written in this order (EPOTrainer._save_checkpoint): `epo_state.json` (atomically), then
TRL's files (model, optimizer, scheduler, RNG), then `trainer_state.json` (atomically) and only after that TRL's
rotation of old checkpoints. So `trainer_state.json` parsing is the completeness marker: a crash at any point
leaves either a complete checkpoint or one without a valid `trainer_state.json`, which `checkpoint_problem`
reports and a resume never picks, and the previous checkpoint is still there (rotation had not run).
"""

from __future__ import annotations

import json
import os
import re

STATE_FILE = "epo_state.json"
TRAINER_STATE = "trainer_state.json"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


def checkpoint_problem(folder: str, needs_epo_state: bool = True) -> str | None:
    """Why `folder` is not a complete checkpoint (None when it is)."""
    if not os.path.isdir(folder):
        return "no such folder"
    try:
        state = read_json(os.path.join(folder, TRAINER_STATE), "the checkpoint was not finished")
        if "global_step" not in state:
            return f"{TRAINER_STATE} has no global_step"
        if needs_epo_state:
            epo = read_json(os.path.join(folder, STATE_FILE), "EPO's entropy history was not saved")
            if "entropy_history" not in epo:
                return f"{STATE_FILE} has no entropy_history"
    except CheckpointError as e:
        return str(e)
    if not any(os.path.exists(os.path.join(folder, name)) for name in _WEIGHTS):
        return "no model weights"
    return None


def checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-N` folders of `output_dir`, newest (largest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def newest_complete(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest complete checkpoint or None, [(newer incomplete checkpoint, why)] skipped on the way)."""
    skipped = []
    for folder in checkpoints(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def step_of(folder: str) -> int:
    return int(read_json(os.path.join(folder, TRAINER_STATE), "the checkpoint was not finished")["global_step"])


def truncate_log(path: str, step: int) -> int:
    """Keep only the rows of a `logs.jsonl` up to `step` (a resumed run re-logs the steps after it); returns the
    number of rows dropped. Unparseable rows (a line cut by a crash) are dropped too."""
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
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    atomic_write_text(path, "".join(kept))
    return dropped
