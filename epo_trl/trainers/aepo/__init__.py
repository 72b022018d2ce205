from ..registry import Method
from .aepo_config import AEPOConfig
from .aepo_trainer import AEPOTrainer

__all__ = ["METHODS", "AEPOConfig", "AEPOTrainer"]


def describe(args: AEPOConfig) -> list[str]:
    return [
        f"AEPO: aepo_coef {args.aepo_coef:g} | target entropy {args.aepo_target_entropy:g} | temperatures "
        f"{args.aepo_temperature_low:g} / {args.aepo_temperature_high:g} | entropy_coef {args.entropy_coef:g}"
    ]


METHODS = (
    Method(
        "aepo",
        AEPOConfig,
        AEPOTrainer,
        help="AEPO: target entropy by a REINFORCE term on temperature-shifted samples",
        describe=describe,
    ),
)
