from dataclasses import dataclass, field

from epo_trl.trainers.grpo import MultiTurnGRPOConfig
from epo_trl.trainers.grpo.grpo_config import check


@dataclass
class ToyConfig(MultiTurnGRPOConfig):
    """MultiTurnGRPOConfig plus the toy method's one field.

    Parameters:
        toy_coef (`float`, *optional*, defaults to `0.0`):
            Weight of the token-mean action entropy bonus.
    """

    toy_coef: float = field(default=0.0, metadata={"help": "Weight (>= 0) of the token-mean action entropy bonus."})

    def __post_init__(self):
        super().__post_init__()
        check(self.toy_coef >= 0, "toy_coef", self.toy_coef, ">= 0")
