"""User mistakes on the command line: one or two lines and exit status 2, not a traceback.

A `UsageError` names the field or input, the value and the fix. `epo-trl` prints it as
`epo-trl <command>: error: <message>` (+ an indented hint) and exits 2; `--debug` (anywhere on the command
line) or `EPO_TRL_DEBUG=1` shows the traceback instead. docs/configuration.md lists every case.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

USAGE_EXIT = 2
DEBUG_ENV = "EPO_TRL_DEBUG"


class UsageError(Exception):
    """A mistake in the command line, config file or environment that the user fixes (exit status 2)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint

    def lines(self) -> list[str]:
        return [self.message] + ([f"  {self.hint}"] if self.hint else [])


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(debug?, argv without `--debug`)."""
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    return debug, [a for a in argv if a != "--debug"]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def user_errors(what: str, hint: str | None = None):
    """Turn the exceptions a wrong setting raises while a run is being set up (before any training) into a
    `UsageError` that says which step failed. Errors during training itself are not wrapped: those are bugs."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, ImportError, OSError, RuntimeError) as e:
        raise UsageError(f"{what}: {first_line(e)}", hint) from e


def require_module(module: str, needed_for: str, install: str) -> None:
    """A `UsageError` naming the install command when an optional dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{needed_for} needs the `{module}` package, which is not installed.", f"fix: {install}")


def run_command(func, argv: list[str], prog: str) -> int:
    """Run `func(argv)`; print a `UsageError` as one or two lines and return 2 (traceback with --debug).

    SIGTERM and Ctrl-C anywhere in the command (outside training, where `StopOnSignal` takes over) end it with one
    line naming what it was doing and what was kept (epo_trl.cli.lifecycle), exit 143 / 130."""
    from .lifecycle import exit_code, interrupted_line, signals_raise
    from .runlock import release_all

    debug, argv = debug_requested(argv)
    try:
        with signals_raise():
            return int(func(argv) or 0)
    except KeyboardInterrupt as e:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # one line per launch, not one per process
            print(f"{prog}: {interrupted_line(e)}", file=sys.stderr, flush=True)
        return exit_code(e)
    except UsageError as e:
        if debug:
            raise
        lines = e.lines()
        print(f"{prog}: error: {lines[0]}", *lines[1:], sep="\n", file=sys.stderr)
        if not e.hint:
            print(f"  (run `{prog} --help` for the options, add --debug for the traceback)", file=sys.stderr)
        return USAGE_EXIT
    finally:
        release_all()  # the command's output_dir locks (epo_trl.cli.runlock)


VLLM_CPU_MIN_HEAD_DIM = 32  # vLLM's CPU attention: "Unsupported CPU attention configuration: head_dim=8"


def require_vllm_cpu_head_dim(head_dim: int, what: str, fix: str) -> None:
    """On a machine without CUDA, refuse attention heads vLLM's CPU build cannot run."""
    import torch

    if head_dim < VLLM_CPU_MIN_HEAD_DIM and not torch.cuda.is_available():
        raise UsageError(
            f"{what} on CPU: vLLM's CPU attention needs head_dim >= {VLLM_CPU_MIN_HEAD_DIM}, and it is {head_dim}.",
            fix,
        )


def check_vllm_cpu_head_dim(model: str, needed_for: str) -> None:
    """`require_vllm_cpu_head_dim` for a local model folder (hub ids are not read here)."""
    import json
    import os

    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        config = json.load(f)
    heads = config.get("num_attention_heads") or 1
    require_vllm_cpu_head_dim(
        config.get("head_dim") or config.get("hidden_size", 0) // heads,
        f"{needed_for} with {model}",
        "fix: use HF generate (--backend hf / --use_vllm false), or a model with larger heads (the built-in tiny "
        "model: --tiny_hidden_size 64 --tiny_head_dim 32).",
    )
