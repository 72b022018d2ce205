from .grpo_config import MultiTurnGRPOConfig
from .grpo_trainer import MultiTurnGRPOTrainer

__all__ = ["MultiTurnGRPOConfig", "MultiTurnGRPOTrainer"]
