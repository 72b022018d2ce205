"""Per-layer fingerprints of the weights a vLLM engine computes with, compared with the trainer's after each push.

Why: the log-prob probe (`vllm_sync.SyncCheck`) sees a stale engine only where the staleness moves log-probs by more
than the engine's kernels differ from the trainer's. In bf16 that difference is ~0.04 nats on SmolLM2-135M while one
optimizer step moves a few weights by one bf16 step: a head or a layer left stale changes the probe by 0.01-0.05
nats, inside the noise (docs/scaling.md). A fingerprint compares the weights themselves, exactly.

What is fingerprinted, per group (a decoder layer `...layers.N`, or a top-level module such as the embedding):
- every linear layer through the engine's own GEMM kernel: the layer applied to unit vectors e_c (fixed columns c)
  returns the columns W[:, c] exactly (one product per output, no rounding). So the copy the engine computes with is
  checked: CPU vLLM drops a linear layer's `weight` for a packed oneDNN copy, and a tied LM head keeps a packed copy
  next to the embedding it shares (the copy a layer-wise reload leaves stale);
- every other parameter (embeddings, norms, biases) as stored.
A group is summarised as float64 sums (sum x, sum x^2, sum |x|): invariant under vLLM's fusion of q/k/v and gate/up
into one layer and under its zero padding of the vocabulary, so the trainer's unfused modules give the same sums. The
trainer's weights are cast to the engine's dtype first (as the push does), so a correct push matches to float64
rounding (~1e-16 relative) and one weight one bf16 step off reads ~1e-7.

Where an engine cannot be fingerprinted (quantized layers, tensor parallel, a server without this package's worker
extension, a stand-in) the result is None and the probe alone checks it.
"""

from __future__ import annotations

import contextlib

import torch

# Columns fingerprinted per linear layer: enough that a training step's changes show in every layer (one changed
# weight is enough), few enough that the kernel calls cost a fraction of the probe's forward.
COLUMNS = 8
# A group's relative mismatch above this is a weight the engine does not share with the trainer. Float64 sums of the
# same values in another order differ by ~1e-16 relative; one bf16 weight one step off in a group: ~1e-7.
FINGERPRINT_TOL = 1e-10
CHUNK = 1 << 24  # elements summed at once (128 MiB in float64)
# `collective_rpc` method name of the worker extension (`--worker-extension-cls`, see `FingerprintWorkerExtension`)
RPC_METHOD = "epo_trl_weight_fingerprint"
WORKER_EXTENSION = "epo_trl.trainers.weight_fingerprint.FingerprintWorkerExtension"

Fingerprint = dict[str, list[float]]  # group -> [sum x, sum x^2, sum |x|]


def probe_columns(k: int) -> list[int]:
    """The input columns a linear layer with `k` inputs is probed at (the same on both sides)."""
    return sorted({(i * k) // COLUMNS for i in range(COLUMNS)} | {k - 1})


def group_of(name: str) -> str:
    """The group of a module (or parameter's owner) name: up to its decoder layer index, else the name itself."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return name


def _add(sums: Fingerprint, group: str, values: torch.Tensor) -> None:
    stats = sums.setdefault(group, [0.0, 0.0, 0.0])
    for chunk in values.detach().reshape(-1).split(CHUNK):  # float64 copies of a chunk at a time, not of a 7B weight
        x = chunk.to(torch.float64)
        stats[0] += x.sum().item()
        stats[1] += (x * x).sum().item()
        stats[2] += x.abs().sum().item()


def _unit_rows(k: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, list[int]]:
    columns = probe_columns(k)
    x = torch.zeros(len(columns), k, dtype=dtype, device=device)
    x[torch.arange(len(columns)), torch.tensor(columns)] = 1
    return x, columns


def engine_fingerprint(model) -> Fingerprint | None:
    """A vLLM model's fingerprint, computed where it lives (a worker). None where it cannot be compared with the
    trainer's: quantized layers, or weights sharded by tensor parallelism."""
    from vllm.distributed import get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

    if get_tensor_model_parallel_world_size() != 1:
        return None
    sums: Fingerprint = {}
    kernel_layers = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, LinearBase | ParallelLMHead):
                continue
            if not isinstance(module.quant_method, UnquantizedLinearMethod | UnquantizedEmbeddingMethod):
                return None
            k = module.embedding_dim if isinstance(module, ParallelLMHead) else module.input_size
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            x, _ = _unit_rows(k, module.params_dtype, device)
            _add(sums, group_of(name), module.quant_method.apply(module, x))
            kernel_layers.add(name)
        for name, param in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            if (leaf == "weight" and owner in kernel_layers) or param.numel() == 0:
                continue
            _add(sums, group_of(owner), param)
    return sums


def trainer_fingerprint(model: torch.nn.Module, dtype: torch.dtype | None) -> Fingerprint:
    """The trainer's fingerprint of `model` (a transformers model, unwrapped) in the engine's `dtype` (None: as held).
    Collective under DeepSpeed ZeRO-3 (each module's parameters are gathered in turn): every rank calls it."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if dtype is None else t.to(dtype)

    sums: Fingerprint = {}
    linear = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                with _gathered([module.weight]):
                    weight = module.weight
                    _add(sums, group_of(name), cast(weight[:, probe_columns(weight.shape[1])].t()))
                linear.add(name)
        for name, param in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            if leaf == "weight" and owner in linear:
                continue
            with _gathered([param]):
                if param.numel():
                    _add(sums, group_of(owner), cast(param))
    return sums


def _gathered(params: list[torch.Tensor]):
    """ZeRO-3: the full parameters for the duration (collective); otherwise nothing to do."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def mismatches(engine: Fingerprint, trainer: Fingerprint) -> dict[str, float]:
    """Each group both hold -> its relative mismatch (0: the same weights)."""
    out = {}
    for group in engine.keys() & trainer.keys():
        (e1, e2, ea), (t1, t2, ta) = engine[group], trainer[group]
        scale, squares = max(ea, ta, 1e-30), max(e2, t2, 1e-30)
        out[group] = max(abs(e1 - t1) / scale, abs(ea - ta) / scale, abs(e2 - t2) / squares)
    return out


def worker_fingerprints(results: list) -> list[Fingerprint] | None:
    """The fingerprints `collective_rpc` returned (one per worker; data-parallel replicas each hold every weight), or
    None if any worker could not make one."""
    if not results or any(not isinstance(r, dict) for r in results):
        return None
    return results


class FingerprintWorkerExtension:
    """vLLM worker extension (`--worker-extension-cls`): `collective_rpc("epo_trl_weight_fingerprint")` returns the
    worker's `engine_fingerprint`. `epo-trl vllm-serve` installs it; the trainer asks through the server's
    `/collective_rpc` (dev mode, which TRL's weight transfer already needs)."""

    def epo_trl_weight_fingerprint(self) -> Fingerprint | None:
        return engine_fingerprint(self.model_runner.get_model())
