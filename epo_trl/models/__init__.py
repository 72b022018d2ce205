"""Models the project builds itself: the offline tiny Qwen2 (tiny.py), SmolLM2-135M from its wheel (smollm2.py),
and the behaviour-cloning warm start (warmstart.py)."""
