"""The package as a user installs it: a wheel built from the tracked tree, installed in a fresh venv, run from a
folder outside the checkout (`epo-trl demo` and `epo-trl train recipes/...` find the recipes shipped inside it).

The fresh venv borrows this venv's third-party packages through a .pth line (torch, TRL: no network, no minutes of
installing); `.pth` files inside that folder are not processed, so this checkout's editable install stays out.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import child_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        path = ROOT / rel
        if path.is_symlink() or path.is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / rel, follow_symlinks=False)
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, env=child_env())  # fmt: skip
    (wheel,) = dist.glob("epo_trl-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # From outside the checkout and without PYTHONPATH: pip must not see this checkout's egg-info as installed.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, cwd=tmp, env=child_env(PYTHONPATH=""))  # fmt: skip
    # After the install: pip would take the borrowed folder's editable epo_trl for an installed one.
    purelib = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    Path(purelib, "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return wheel, venv, tmp / "elsewhere"


def test_the_wheel_ships_the_recipes_and_not_the_research_tools(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "epo_trl/recipes/cpu/demo.yaml" in names and "epo_trl/recipes/slurm/train_multinode.sbatch" in names
    tracked = {p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*") if p.is_file()}
    assert {n.removeprefix("epo_trl/recipes/") for n in names if n.startswith("epo_trl/recipes/")} == tracked


def test_epo_trl_demo_runs_from_a_folder_outside_the_checkout(installed):
    _, venv, elsewhere = installed
    elsewhere.mkdir()
    env = child_env(PYTHONPATH="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import epo_trl; print(epo_trl.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(venv), where  # the installed copy, not this checkout
    demo = subprocess.run([str(venv / "bin" / "epo-trl"), "demo", "--quick", "--max-steps", "1", "--eval-tasks", "2", "--warmstart-steps", "2",
                           "--output-dir", "demo-run"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    metrics = json.loads((elsewhere / "demo-run" / "final_metrics.json").read_text())
    assert (metrics["recipe"], metrics["global_step"], metrics["algo"]) == ("demo.yaml", 1, "epo")
    assert metrics["eval_after"]["valid_seen"]["episodes"] == 2
    # A recipe path as the docs write it (`recipes/cpu/...`) resolves to the shipped one where no such file is.
    assert not (elsewhere / "recipes").exists()
    train = subprocess.run([str(venv / "bin" / "epo-trl"), "train", "recipes/cpu/maze_epo.yaml", "--max_steps", "1",
                            "--task_limit", "2", "--report_to", "none", "--output_dir", "train-run"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert json.loads((elsewhere / "train-run" / "final_metrics.json").read_text())["global_step"] == 1
    assert os.path.isdir(elsewhere / "train-run")
