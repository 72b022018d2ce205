"""A CPU weight-transfer backend for vLLM servers: `{"backend": "gloo"}`, both sides of it.

TRL 1.16 pushes weights into a `vllm serve` server through vLLM's weight-transfer engines (`/init_weight_transfer_engine`,
`/start_weight_update`, `/update_weights`, `/finish_weight_update`) with the `nccl` backend, which needs CUDA on both
ends. This module adds a `gloo` backend that runs on CPU:

- server side, `GlooWeightTransferEngine`: registered in vLLM's `WeightTransferEngineFactory` by `register()`, the
  `vllm.general_plugins` entry point of this package (pyproject.toml), which vLLM runs in every process it starts, so
  a plain `vllm serve --weight-transfer-config '{"backend": "gloo"}'` has it once epo-trl is installed. Weights arrive
  in checkpoint format through vLLM's layer-wise reload (the path its NCCL engine takes); a tied LM head is re-packed
  after it (`vllm_sync.repack_tied_head`: CPU vLLM's reload leaves it stale).
- trainer side, `open_group` + `send`: used by `vllm_servers.ServerClient` when a server reports this backend.

The trainer is rank 0 of a gloo group with every server worker (rank 1..), rendezvousing on a TCPStore the trainer
hosts at `master_address:master_port` (TRL's `vllm_group_port`), as vLLM's NCCL engine does. Tensors travel as raw
bytes, packed into buffers of at most `CHUNK_BYTES` (few gloo round trips; both sides derive the same packing from
the announced names, dtypes and shapes).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

BACKEND = "gloo"
CHUNK_BYTES = 64 << 20
_STORE_PREFIX = "epo_trl/weight_transfer"


def register() -> None:
    """`vllm.general_plugins` entry point: register the gloo engine in this vLLM process (vLLM may run plugins more
    than once per process; a second registration is a no-op)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "GlooWeightTransferEngine")
    except ValueError:  # already registered
        pass


ENTRY_POINT = f"{__name__}:register"
PLUGIN_GROUP = "vllm.general_plugins"  # vLLM runs these in every process it starts (API server, engine, workers)


def plugin_installed() -> bool:
    """Whether vLLM will find `register` among the installed distributions' entry points (`pip install epo-trl`)."""
    from importlib.metadata import entry_points

    return any(ep.value == ENTRY_POINT for ep in entry_points(group=PLUGIN_GROUP))


def write_plugin_metadata(folder: str) -> str:
    """Make `folder`, once on a process's PYTHONPATH, declare the entry point as an installed distribution would (for
    a source checkout that is not installed; vLLM discovers plugins through importlib.metadata only; vLLM's
    `VLLM_PLUGINS` only filters what that finds). Returns `folder`."""
    import os

    info = os.path.join(folder, "epo_trl_vllm_plugin-0.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: epo-trl-vllm-plugin\nVersion: 0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write(f"[{PLUGIN_GROUP}]\nepo_trl_gloo = {ENTRY_POINT}\n")
    return folder


def open_group(host: str, port: int, rank: int, world_size: int, timeout_s: float = 300.0):
    """A gloo group of its own (not torch.distributed's default group, which a vLLM worker already uses), on a TCPStore
    that rank 0 hosts. Returns (group, store): the group needs the store alive."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    group = dist.ProcessGroupGloo(dist.PrefixStore(_STORE_PREFIX, store), rank, world_size, timeout)
    return group, store


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {name!r} in a weight update")
    return dtype


def _nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def chunks(sizes: list[int], limit: int = CHUNK_BYTES) -> list[slice]:
    """Consecutive groups of tensors of at most `limit` bytes each (a larger tensor travels alone)."""
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            out.append(slice(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        out.append(slice(start, len(sizes)))
    return out


def _broadcast(group, buffer: torch.Tensor) -> None:
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([buffer], options).wait()


def send(group, named_tensors: Iterator[tuple[str, torch.Tensor]], metadata: list) -> None:
    """Trainer side (rank 0): stream `named_tensors` (described by `metadata`, (name, dtype, shape) each) to the
    group, packed as `receive` unpacks them."""
    sizes = [_nbytes(_dtype(dtype), shape) for _, dtype, shape in metadata]
    for part in chunks(sizes):
        pieces = []
        for (name, dtype, shape), (got_name, tensor) in zip(metadata[part], named_tensors, strict=False):
            if got_name != name or list(tensor.shape) != list(shape) or tensor.dtype != _dtype(dtype):
                raise ValueError(f"Weight update: expected {name} {dtype} {shape}, got {got_name} {tensor.dtype} "
                                 f"{list(tensor.shape)}")  # fmt: skip
            pieces.append(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8))
        _broadcast(group, torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone())


def receive(group, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Worker side: the tensors `send` streams, one (name, tensor) at a time."""
    dtype_objs = [_dtype(d) for d in dtypes]
    sizes = [_nbytes(d, s) for d, s in zip(dtype_objs, shapes)]
    for part in chunks(sizes):
        buffer = torch.empty(sum(sizes[part]), dtype=torch.uint8)
        _broadcast(group, buffer)
        offset = 0
        for name, dtype, shape, size in zip(names[part], dtype_objs[part], shapes[part], sizes[part]):
            yield name, buffer[offset : offset + size].view(dtype).view(shape)
            offset += size


def _worker_engine_classes():
    """The vLLM-side classes, defined on first use: this module is also imported by trainers that have no vLLM."""
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    @dataclass
    class GlooInitInfo(WeightTransferInitInfo):
        master_address: str
        master_port: int
        rank_offset: int
        world_size: int

    @dataclass
    class GlooUpdateInfo(WeightTransferUpdateInfo):
        names: list[str]
        dtype_names: list[str]
        shapes: list[list[int]]

        def __post_init__(self):
            if not len(self.names) == len(self.dtype_names) == len(self.shapes):
                raise ValueError("names, dtype_names and shapes must have the same length")

    class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
        """vLLM worker side of the gloo backend (see the module docstring)."""

        init_info_cls = GlooInitInfo
        update_info_cls = GlooUpdateInfo
        supports_draft_weight_update = False

        def __init__(self, config, vllm_config, device, model):
            super().__init__(config, vllm_config, device, model)
            self.group = self.store = None

        def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
            parallel = self.parallel_config
            # unique across data-parallel replicas, after the trainer's rank(s): as vLLM's NCCL engine numbers them
            rank = parallel.data_parallel_index * parallel.world_size + parallel.rank + init_info.rank_offset
            self.group, self.store = open_group(
                init_info.master_address, init_info.master_port, rank, init_info.world_size
            )

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            from .vllm_sync import repack_tied_head

            finalize_layerwise_reload(self.model, self.model_config)
            repack_tied_head(self.model)

        def update_weights(self, update_info) -> None:
            # The base class ends with torch.accelerator.synchronize(), which has no device to sync on a CPU server:
            # gloo's broadcast is synchronous, the weights are in place when receive_weights returns.
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, update_info: GlooUpdateInfo) -> None:
            if self.group is None:
                raise RuntimeError("gloo weight transfer not initialized: call /init_weight_transfer_engine first")
            from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

            with disable_mtp_completeness_check():
                for name, tensor in receive(
                    self.group, update_info.names, update_info.dtype_names, update_info.shapes
                ):
                    self.model.load_weights([(name, tensor.to(self.device))])

        def shutdown(self) -> None:
            self.group = self.store = None

    return GlooInitInfo, GlooUpdateInfo, GlooWeightTransferEngine


def __getattr__(name: str):
    # vLLM's factory loads the engine class by name from this module (lazily, in the worker that needs it).
    if name in {"GlooInitInfo", "GlooUpdateInfo", "GlooWeightTransferEngine"}:
        classes = dict(zip(("GlooInitInfo", "GlooUpdateInfo", "GlooWeightTransferEngine"), _worker_engine_classes()))
        globals().update(classes)
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
