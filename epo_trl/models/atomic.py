"""Model folders that are either complete or absent.

A model is built (saved, warm-started, converted) in a temporary sibling folder, `<name>.tmp-<pid>`, and renamed into
place only once finished. A build that is stopped (Ctrl-C, SIGTERM, a full disk, SIGKILL) leaves at most its temporary
folder, which the next build removes: a folder at the final path is always a finished model, never random or
weightless weights that later runs would train on without a word.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Callable, Iterator

TMP_MARK = ".tmp-"
WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")


def has_weights(path: str) -> bool:
    """`config.json` and a weights file: what a folder written by an older version, killed half-way, may lack."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        glob.glob(os.path.join(path, pattern)) for pattern in WEIGHT_PATTERNS
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_builds(path: str) -> list[str]:
    """Remove the temporary folders of builds of `path` whose process is gone (killed mid-build); return them. One
    whose PID now belongs to another live process is left (ignored: every build writes its own)."""
    parent, name = os.path.split(os.path.abspath(path))
    prefix = f"{name}{TMP_MARK}"
    removed = []
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        pid = entry[len(prefix) :]
        if not entry.startswith(prefix) or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another process is building it right now
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        removed.append(os.path.join(parent, entry))
    return removed


@contextlib.contextmanager
def build_atomically(path: str, ready: Callable[[str], bool] = has_weights) -> Iterator[str]:
    """Yield a temporary folder to build the model of `path` in; when the block finishes, rename it to `path`.

    When the block raises (anything, Ctrl-C included) the temporary folder is deleted and `path` is left as it was.
    A folder already at `path` that is not `ready` (an unfinished build of an older version) is replaced; one that
    is `ready` when the block finishes (another process finished the same build first) is kept and ours dropped.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_stale_builds(path)
    tmp = os.path.join(parent, f"{os.path.basename(os.path.abspath(path))}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(path) and ready(path):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if os.path.lexists(path):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (os.path.isdir(path) and ready(path)):  # not a build that finished first in another process
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
