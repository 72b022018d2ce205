"""`epo-trl` as tests/test_docs_run.py runs the docs' shell blocks: the real CLI, with shorter runs asked for by the
flags a user could type (appended here, in the open: the CLI itself has no test switch).

A capped key is lowered to its cap when the command line or the recipe leaves it above the cap or unlimited (-1 or
unset); a key unset everywhere that defaults to 0 (the warm-start steps) stays 0.
"""

import os
import sys

from epo_trl.cli import main
from epo_trl.cli.parser import flag_value, read_config_file, split_config_path

CAPS = {
    "train": {"max_steps": 2, "warmstart_steps": 10, "warmstart_noisy_steps": 10, "max_turns": 3},
    "eval": {"limit": 2, "max_turns": 3},
}
UNSET_IS_ZERO = {"warmstart_steps", "warmstart_noisy_steps"}


def capped(argv: list[str]) -> list[str]:
    if not argv or argv[0] not in CAPS or {"-h", "--help"} & set(argv):
        return argv
    path, rest = split_config_path(argv[1:])
    file_values = read_config_file(path) if path and os.path.isfile(path) else {}
    extra = []
    for key, cap in CAPS[argv[0]].items():
        raw = flag_value(rest, key)
        value = raw if raw is not None else file_values.get(key)
        if value is None and key in UNSET_IS_ZERO:
            continue
        if value is None or not 0 <= int(value) <= cap:
            extra += [f"--{key}", str(cap)]
    if extra:
        print(f"docs test: appended {' '.join(extra)}", file=sys.stderr)
    return argv + extra


if __name__ == "__main__":
    sys.exit(main(capped(sys.argv[1:])))
