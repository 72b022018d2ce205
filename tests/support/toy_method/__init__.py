"""A method that lives outside the package, as a user's would: a folder + one `register_method` line.

`toy` is GRPO plus `toy_coef` x the token-mean action entropy as a bonus, and counts its optimizer steps (logged as
`toy/steps`, kept in checkpoints). tests/test_method_registry.py trains it through `epo-trl train`.
"""

from epo_trl.trainers.registry import Method

from .toy_config import ToyConfig
from .toy_trainer import ToyTrainer


def describe(args: ToyConfig) -> list[str]:
    return [f"toy: toy_coef {args.toy_coef:g}"]


METHODS = (Method("toy", ToyConfig, ToyTrainer, help="GRPO + a token-mean entropy bonus (a test method)",
                  describe=describe),)  # fmt: skip
