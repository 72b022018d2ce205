"""One run per `output_dir`: a lock taken before anything in the folder is touched.

Two runs writing one folder would interleave `logs.jsonl` and overwrite each other's checkpoints, both exiting 0. The
main process takes an exclusive `flock` on `<output_dir>/.epo-trl.lock` (holding its PID) before it removes or
truncates the log and before the model is built; a second run exits 2 with one line naming the first's PID. The
lock belongs to the open file: the kernel drops it when the process ends, however it ends, so a crashed or killed
run leaves no stale lock (the file stays, unlocked). Under a multi-process launch only rank 0 takes it.
"""

from __future__ import annotations

import os
import socket

from .errors import UsageError

LOCK_FILE = ".epo-trl.lock"
_held: dict[str, int] = {}  # real path of the folder -> the locked file descriptor


def _owner(fd: int) -> tuple[str, str]:
    """(PID, " on HOST" when another machine) of the lock's holder, from the file."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 200).decode(errors="replace").split()
    except OSError:
        text = []
    host = text[1] if len(text) > 1 else ""
    return (text[0] if text else "unknown"), (f" on {host}" if host and host != socket.gethostname() else "")


def lock_output_dir(output_dir: str, prog: str = "epo-trl train") -> None:
    """Take the folder's lock for this process (released by `release_all` or at exit), or raise `UsageError`."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs are not guarded
        return
    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    if key in _held:
        return
    path = os.path.join(output_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, host = _owner(fd)
        os.close(fd)
        raise UsageError(
            f"output_dir={output_dir!r} is in use by another run (PID {pid}{host}): two runs in one folder would "
            "interleave logs.jsonl and overwrite each other's checkpoints.",
            f"fix: wait for that run to end (or stop it: kill {pid}), or pass another --output_dir.",
        ) from None
    except OSError:  # a filesystem without flock (some network mounts): run unguarded rather than not at all
        os.close(fd)
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()} {prog}\n".encode())
    _held[key] = fd


def release_all() -> None:
    """Drop every lock this process holds (the end of a command run in-process; a process that exits drops them
    anyway)."""
    while _held:
        _, fd = _held.popitem()
        try:
            os.close(fd)
        except OSError:
            pass
