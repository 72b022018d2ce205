"""Docs that run as written: every Python and shell block of README.md and docs/*.md is executed.

How (documented in docs/configuration.md, "Docs that run"):
- Python blocks run each on its own (a fresh namespace, a fresh working folder): a fragment fails.
- Shell blocks run with `bash -e` in a fresh folder that links `recipes/`, with `epo-trl` on PATH.
- Hub ids (`Qwen/...`, `HuggingFaceTB/...`, ...) are replaced by a tiny local model (Qwen2.5's chat template): no
  network here.
- Shell blocks' `epo-trl` is tests/support/docs_cli.py: the real CLI with shorter runs asked for by appended flags
  (`epo-trl train`: max_steps 2, warm-start steps 10, max_turns 3; `epo-trl eval`: 2 tasks, max_turns 3); the CLI
  has no test switch. Python blocks keep their own runs short.
- A block that cannot run here (GPU, vLLM, several nodes, network, installs) has `<!-- no-run: why -->` on the
  line before its fence; it is still syntax-checked. A block that installs, downloads or calls make/sbatch
  without the marker fails WITHOUT being run.
"""

import glob
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
NO_RUN = re.compile(r"^<!--\s*no-run:\s*(\S.*?)\s*-->$")
HUB_ID = re.compile(r"\b(?:Qwen|HuggingFaceTB|meta-llama|mistralai|google|microsoft)/[\w.-]+")
FENCE = re.compile(r"^```(\S*)\s*$")
# Never executed, even by mistake: a block doing any of this must carry a no-run marker (it would change the
# test machine, or need the network / a cluster).
UNSAFE = re.compile(
    r"\b(pip3?|uv pip|conda|apt-get|apt|brew) +install\b|\bsudo\b|\bmake\b|\bsbatch\b|\bsrun\b|"
    r"\balfworld-download\b|\b(hf|huggingface-cli) +download\b|\bcurl\b|\bwget\b|\bgit +clone\b"
)
UNSAFE_PYTHON = re.compile(r"\b(pip|apt-get|conda)\b[^\n]*\binstall\b|\bsnapshot_download\b")


@dataclass
class Block:
    path: str
    line: int
    lang: str
    code: str
    no_run: str | None

    @property
    def id(self) -> str:
        return f"{os.path.relpath(self.path, ROOT)}:{self.line}"


def collect(path: str) -> tuple[list[Block], list[int]]:
    """(code blocks, lines of no-run markers that do not precede a fence)."""
    lines = Path(path).read_text().splitlines()
    blocks, stray, i = [], [], 0
    while i < len(lines):
        if NO_RUN.match(lines[i].strip()) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            stray.append(i + 1)
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = NO_RUN.match(lines[i - 1].strip()) if i else None
        lang = LANGS.get(match.group(1).lower())
        if lang:
            code = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(path, i + 1, lang, code, marker.group(1) if marker else None))
        i = end + 1
    return blocks, stray


BLOCKS = [b for path in DOCS for b in collect(path)[0]]


def test_docs_have_blocks_and_markers_precede_them():
    assert len(BLOCKS) >= 10 and any(b.path.endswith("README.md") for b in BLOCKS)
    for path in DOCS:
        assert collect(path)[1] == [], f"{path}: a no-run marker must be the line right before a code fence"


@pytest.fixture(scope="session")
def hub_standin(tmp_path_factory):
    """The tiny local model that replaces every hub id in the docs; its chat template is Qwen2.5's (tool calling,
    as the Qwen2.5 models the docs name have), so TRL's `environment_factory` examples run too."""
    from epo_trl.models.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("hub_standin")), extra_words=["Solve"], tool_calling=True)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_block_runs_as_written(block, hub_standin, tmp_path, monkeypatch):
    code = HUB_ID.sub(hub_standin, block.code)
    if block.lang == "python":
        compiled = compile(code, block.id, "exec")  # syntax-checked even when it cannot run here
    else:
        check = subprocess.run(["bash", "-n", "-c", code], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    if block.no_run:
        pytest.skip(f"no-run: {block.no_run}")
    unsafe = (UNSAFE if block.lang == "bash" else UNSAFE_PYTHON).search(block.code)
    assert unsafe is None, f"{block.id} runs `{unsafe.group(0)}`: mark it <!-- no-run: why --> (not executed)"
    monkeypatch.chdir(tmp_path)
    if block.lang == "python":
        exec(compiled, {"__name__": "__main__"})
        return
    os.symlink(os.path.join(ROOT, "recipes"), tmp_path / "recipes")
    shim = tmp_path / ".bin" / "epo-trl"
    shim.parent.mkdir()
    shim.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{os.path.join(ROOT, "tests", "support", "docs_cli.py")}" "$@"\n'
    )
    shim.chmod(0o755)
    path = os.pathsep.join([str(shim.parent), os.path.dirname(sys.executable), os.environ["PATH"]])
    env = {**os.environ, "PATH": path}
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, f"{block.id} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
