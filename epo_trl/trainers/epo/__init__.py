from .epo_config import EPOConfig
from .epo_trainer import EPOTrainer

__all__ = ["EPOConfig", "EPOTrainer"]
