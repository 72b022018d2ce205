"""`epo-trl` command line: `train`, `eval`, `demo` (also `python -m epo_trl ...`).

Each command is a module here (train.py, evaluate.py, demo.py) with a `main(argv) -> exit code`; they share the
config parser (parser.py), the one-line errors (errors.py), the console (console.py) and signal handling.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from .errors import run_command

# subcommand -> "module:function"; each function takes argv (list[str]) and returns an exit code.
COMMANDS = {
    "train": "epo_trl.cli.train:main",
    "eval": "epo_trl.cli.evaluate:main",
    "demo": "epo_trl.cli.demo:main",
    # issue 39: an env as an OpenEnv server (epo_trl/cli/serve_env.py)
    "serve-env": "epo_trl.cli.serve_env:main",
    # issue 37: a vLLM server on GPU or CPU (gloo weight transfer; epo_trl/cli/vllm_serve.py)
    "vllm-serve": "epo_trl.cli.vllm_serve:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: epo-trl {" + ",".join(COMMANDS) + "} [options]\n\nRun `epo-trl COMMAND --help` for options.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"epo-trl: error: unknown command {command!r}{hint}; choose one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[command].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    code = run_command(func, rest, f"epo-trl {command}")
    from ..distributed import end_launched_process

    return end_launched_process(code)  # under a multi-process launch: exits here, after the exit handlers
