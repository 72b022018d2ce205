"""Data-parallel vLLM serving: one trainer, several `trl vllm-serve` servers.

TRL 1.16's `VLLMGeneration` (server mode) talks to one `VLLMClient` on the main process; a multi-node run then has
one server as its ceiling. `ServerPool` has the client's interface and fans out behind it:

- `generate`: the prompts of the call (already gathered from every rank by TRL) are split into contiguous,
  near-equal parts, one per server, sent concurrently, and the results concatenated in order — so TRL's broadcast
  and per-rank slicing, and our lockstep semantics, are unchanged.
- `update_named_params`: the parameters are iterated ONCE (under ZeRO-3 each one is gathered collectively on
  every rank) and streamed to every server in chunks of at most `chunk_bytes`, so memory stays bounded.
- `reset_prefix_cache`, `init_communicator`: every server (each on its own NCCL group port).

Enable it with `EPOConfig.vllm_server_base_urls` (EPOTrainer / AEPOTrainer call `attach_server_pool`).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch


def split_evenly(n: int, parts: int) -> list[slice]:
    """Contiguous slices of range(n), sizes differing by at most one (the first ones larger)."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (i < extra)
        out.append(slice(start, stop))
        start = stop
    return out


class ServerPool:
    """A `trl.generation.vllm_client.VLLMClient` look-alike over several clients (see the module docstring)."""

    def __init__(self, clients: list, chunk_bytes: int = 1 << 30):
        if not clients:
            raise ValueError("ServerPool needs at least one vLLM client.")
        self.clients, self.chunk_bytes = list(clients), chunk_bytes
        self._executor = ThreadPoolExecutor(len(self.clients), thread_name_prefix="epo-vllm-server")

    def __len__(self) -> int:
        return len(self.clients)

    def init_communicator(self, device=0) -> None:
        for client in self.clients:  # sequential: each rendezvous blocks until its server joins
            client.init_communicator(device=device)

    def get_server_info(self) -> dict:
        return self.clients[0].get_server_info()

    def generate(self, prompts: list, features=None, n: int = 1, **sampling) -> dict:
        parts = [p for p in split_evenly(len(prompts), len(self.clients)) if p.stop > p.start]

        def send(client, part):
            chunk_features = None if features is None else features[part]
            return client.generate(prompts=prompts[part], features=chunk_features, n=n, **sampling)

        futures = [self._executor.submit(send, self.clients[i], part) for i, part in enumerate(parts)]
        outputs = [f.result() for f in futures]
        merged: dict = {}
        for key in ("prompt_ids", "completion_ids", "logprobs", "logprob_token_ids"):
            values = [out.get(key) for out in outputs]
            merged[key] = None if any(v is None for v in values) else [x for v in values for x in v]
        return merged

    def update_named_params(self, metadata: list, named_params: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Stream every tensor to every server, iterating `named_params` once, in chunks of <= chunk_bytes."""
        chunk_meta, chunk = [], []
        size = 0
        for meta, (name, tensor) in zip(metadata, named_params, strict=True):
            # The iterator may hand out a gathered buffer that is freed after this step: keep a copy until sent.
            chunk_meta.append(meta)
            chunk.append((name, tensor.detach().clone()))
            size += tensor.numel() * tensor.element_size()
            if size >= self.chunk_bytes:
                self._send(chunk_meta, chunk)
                chunk_meta, chunk, size = [], [], 0
        if chunk:
            self._send(chunk_meta, chunk)

    def _send(self, metadata: list, chunk: list) -> None:
        for client in self.clients:  # one NCCL group per server: sequential broadcasts from this process
            client.update_named_params(metadata, iter(chunk))

    def reset_prefix_cache(self) -> None:
        for future in [self._executor.submit(client.reset_prefix_cache) for client in self.clients]:
            future.result()

    def close_communicator(self) -> None:
        for client in self.clients:
            client.close_communicator()


def attach_server_pool(trainer) -> None:
    """Replace the trainer's single vLLM client by a `ServerPool` over `args.vllm_server_base_urls` (main process;
    TRL already connected the first URL). A no-op unless server mode with several URLs."""
    args = trainer.args
    urls = args.vllm_server_base_urls
    if not (trainer.use_vllm and args.vllm_mode == "server" and urls):
        return
    if not trainer.accelerator.is_main_process:
        return  # TRL's other ranks only gather/broadcast: they never talk to a server
    from trl.generation import vllm_generation

    vllm = trainer.vllm_generation
    clients = [vllm.vllm_client]
    for i, url in enumerate(urls[1:], start=1):
        client = vllm_generation.VLLMClient(
            base_url=url, group_port=args.vllm_group_port + i, connection_timeout=args.vllm_server_timeout
        )
        client.init_communicator(device=trainer.accelerator.device)
        clients.append(client)
    vllm.vllm_client = ServerPool(clients)
