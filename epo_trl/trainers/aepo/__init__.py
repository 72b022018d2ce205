from .aepo_config import AEPOConfig
from .aepo_trainer import AEPOTrainer

__all__ = ["AEPOConfig", "AEPOTrainer"]
