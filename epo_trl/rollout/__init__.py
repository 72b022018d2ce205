"""Multi-turn rollouts of text environments for TRL trainers.

- `TrajectoryRollout`: one row per episode (TRL's `rollout_func` contract, works with a plain GRPOTrainer).
- `StepRollout`: one row per (episode, turn), the EPO paper's setup (EPOTrainer calls its
  `build_training_batch` hook).
- `run_episodes`: play tasks without a trainer (evaluation, benchmarks).
"""

from ..envs.pool import EnvPool
from .backends.base import Generation, GenerationBackend, RankSync
from .backends.hf import HFBackend
from .backends.hf_kv_cache import KVCacheHFBackend
from .backends.scripted import CallableBackend
from .backends.vllm import VLLMBackend
from .config import RolloutConfig
from .engine import RolloutEngine, run_episodes, success_rate
from .episode import Episode, RolloutResult
from .parsing import ActionParser, ParsedAction
from .prompts import PromptBuilder
from .rewards import env_return_reward, episode_return_reward, won_reward
from .step import StepRollout
from .trajectory import TrajectoryRollout

__all__ = [
    "ActionParser",
    "CallableBackend",
    "EnvPool",
    "Episode",
    "Generation",
    "GenerationBackend",
    "HFBackend",
    "KVCacheHFBackend",
    "ParsedAction",
    "PromptBuilder",
    "RankSync",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutResult",
    "StepRollout",
    "TrajectoryRollout",
    "VLLMBackend",
    "env_return_reward",
    "episode_return_reward",
    "run_episodes",
    "success_rate",
    "won_reward",
]
