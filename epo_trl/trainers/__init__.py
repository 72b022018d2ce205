"""The trainers: one folder per method on one multi-turn GRPO base.

    grpo/   MultiTurnGRPOConfig / MultiTurnGRPOTrainer: TRL's GRPO plus the multi-turn machinery every method
            shares (step-mode rows, row chunks, vLLM weight sync and its check, per-turn entropy, crash-safe state)
    epo/    EPOConfig / EPOTrainer: the entropy bonus, entropy smoothing and the phase schedule
    aepo/   AEPOConfig / AEPOTrainer: target-entropy control by a REINFORCE term on temperature-shifted samples

    registry.py  the methods `--algo` runs, by name (`Method`, `register_method`, `get_method`)

A new method is a copied folder: `<name>_config.py` (a dataclass over MultiTurnGRPOConfig), `<name>_trainer.py`
(overrides of the base's hooks), `<name>_math.py` (pure tensor math, hand-checked in tests) and `METHODS` in its
`__init__.py`; plus one line in `registry.BUILTIN` (docs/architecture.md has a worked example).
"""
