from ..registry import Method
from .grpo_config import MultiTurnGRPOConfig
from .grpo_trainer import MultiTurnGRPOTrainer

__all__ = ["METHODS", "MultiTurnGRPOConfig", "MultiTurnGRPOTrainer"]

METHODS = (
    Method(
        "grpo",
        MultiTurnGRPOConfig,
        MultiTurnGRPOTrainer,
        help="multi-turn GRPO, the base every method builds on (its loss is TRL's GRPOTrainer's, tested)",
        pins={"entropy_coef": 0.0},
    ),
)
