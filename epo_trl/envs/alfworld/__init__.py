"""ALFWorld (TextWorld engine): the adapter (env.py) and the sample games written for tests (games.py)."""

from .env import ALFWORLD_PROMPT_HEADER, ALFWorldFactory, ALFWorldTextEnv

__all__ = ["ALFWORLD_PROMPT_HEADER", "ALFWorldFactory", "ALFWorldTextEnv"]
