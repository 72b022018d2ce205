import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402


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
