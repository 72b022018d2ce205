"""Stops and faults outside the training loop: one line saying what was happening and what was kept.

`epo-trl` commands run inside `signals_raise()` (epo_trl.cli.errors.run_command): SIGTERM, like Ctrl-C, raises
`Interrupted` (a `KeyboardInterrupt`) wherever the command is, so `finally` blocks run (an unfinished model folder is
deleted, env workers are closed), and the command exits 143 / 130 with one line. Each long stretch of work is a
`phase(doing, kept)`; the innermost phase an interrupt leaves is written on it, and the line names it. Inside
`trainer.train()` of `epo-trl train`, `StopOnSignal` (epo_trl.cli.signals) takes over: stop at the step's end and
save.

`is_disk_full` recognises a full disk however the writer reports it: an `OSError` (ENOSPC), torch.save's
`RuntimeError` (which does not say why: `unexpected pos 576 vs 534`; the free space is checked), safetensors'
`SafetensorError` (not an OSError: `Error while serializing: I/O error: No space left on device (os error 28)`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
from collections.abc import Iterator

NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
DISK_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded", "QuotaExceeded")
# A write that failed without saying why counts as a full disk when the disk it wrote to has less than this left:
# torch.save on a full disk says "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534".
NEARLY_FULL_BYTES = 16 * 2**20
WRITE_FAILED_TEXT = ("unexpected pos", "PytorchStreamWriter", "write failed", "I/O error", "IoError")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT received outside training (raised by `signals_raise`'s handler)."""

    def __init__(self, signum: int):
        super().__init__(NAMES.get(signum, f"signal {signum}"))
        self.signum = signum


@contextlib.contextmanager
def phase(doing: str, kept: str) -> Iterator[None]:
    """A stretch of work the interrupt line can name: `doing` ("warm-starting the model in runs/x/tiny-model") and
    what a stop here keeps or loses (`kept`). An interrupt leaving the block carries the innermost phase."""
    try:
        yield
    except KeyboardInterrupt as e:
        if getattr(e, "phase", None) is None:
            e.phase = (doing, kept)
        raise


def _raise(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` inside the block (the main thread only; an ignored signal stays
    ignored, e.g. SIGINT of a background job). The previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in NAMES}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def interrupted_line(exc: KeyboardInterrupt) -> str:
    """The one line of a stop outside training: which signal, during what, and what was kept."""
    signum = getattr(exc, "signum", signal.SIGINT)
    where = getattr(exc, "phase", None)
    if where is None:
        return "interrupted (Ctrl-C)." if signum == signal.SIGINT else f"interrupted by {NAMES.get(signum, signum)}."
    doing, kept = where
    return f"interrupted by {NAMES.get(signum, f'signal {signum}')} while {doing}: {kept}."


def is_disk_full(exc: BaseException, path: str | None = None) -> bool:
    """Whether `exc` reports a full disk (or quota); `path`: where it was writing, checked for a write that failed
    without a reason (torch.save's "file write failed") when the disk there is nearly full."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if any(s in text for s in DISK_FULL_TEXT):
        return True
    if path is None or not any(s in text for s in WRITE_FAILED_TEXT):
        return False
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe or ".").free < NEARLY_FULL_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def disk_full_is_usage_error(doing: str, path: str, fix: str) -> Iterator[None]:
    """A full disk inside the block becomes one `UsageError` line: `disk full while <doing> (<path>): <error>`."""
    from .errors import UsageError, first_line

    try:
        yield
    except UsageError:
        raise
    except Exception as e:
        if not is_disk_full(e, path):
            raise
        raise UsageError(f"disk full while {doing} in {path!r}: {first_line(e)}", f"fix: {fix}") from e
