from ..registry import Method
from .epo_config import EPOConfig
from .epo_trainer import EPOTrainer

__all__ = ["METHODS", "EPOConfig", "EPOTrainer"]


def describe(args: EPOConfig) -> list[str]:
    band = "off"
    if args.smoothing:
        window = args.entropy_history_window or "cumulative"
        band = (
            f"coef {args.smoothing_coef:g}, kappa [{args.smoothing_kappa_low:g}, {args.smoothing_kappa_high:g}], "
            f"entropy_history_window {window}, schedule {args.entropy_schedule}"
        )
    return [f"EPO: entropy_coef {args.entropy_coef:g} | smoothing {band}"]


def entropy_band(args: EPOConfig) -> tuple[float, float] | None:
    return (args.smoothing_kappa_low, args.smoothing_kappa_high) if args.smoothing else None


METHODS = (
    Method(
        "epo",
        EPOConfig,
        EPOTrainer,
        help="EPO: multi-turn entropy bonus + entropy smoothing around each turn's history + phase schedule",
        describe=describe,
        entropy_band=entropy_band,
    ),
    Method(
        "epo-base",
        EPOConfig,
        EPOTrainer,
        help="EPO-Base: EPO's multi-turn entropy bonus alone (smoothing off)",
        pins={"smoothing": False},
        describe=describe,
        entropy_band=entropy_band,
    ),
)
