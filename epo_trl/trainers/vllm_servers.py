"""Data-parallel vLLM serving: one trainer, several vLLM servers (`epo-trl vllm-serve` / `trl vllm-serve`).

TRL 1.16's `VLLMGeneration` (server mode) talks to one `VLLMClient` on the main process; a multi-node run then has
one server as its ceiling. `ServerPool` has the client's interface and fans out behind it:

- `generate`: the prompts of the call (already gathered from every rank by TRL) are split into contiguous,
  near-equal parts, one per server, sent concurrently, and the results concatenated in order — so TRL's broadcast
  and per-rank slicing, and our lockstep semantics, are unchanged.
- `update_named_params`: the parameters are iterated ONCE (under ZeRO-3 each one is gathered collectively on
  every rank) and streamed to every server in chunks of at most `chunk_bytes`, so memory stays bounded.
- `reset_prefix_cache`, `init_communicator`: every server (each on its own weight-transfer group port).

Enable it with `EPOConfig.vllm_server_base_urls` (EPOTrainer / AEPOTrainer call `attach_server_pool`).

Every client (one server or several) is a `ServerClient`, TRL's `VLLMClient` with two additions, installed as
`trl.generation.vllm_generation.VLLMClient` when this module is imported (so TRL's own construction of the first
client builds one too):

- the weight-transfer backend follows the server: a server started by `epo-trl vllm-serve` on CPU reports
  `{"backend": "gloo"}` (epo_trl.trainers.vllm_gloo) and gets the weights over gloo; a GPU server reports `nccl` and
  gets TRL's NCCL broadcast, unchanged. No trainer setting: the same `vllm_mode: server` config runs on both.
- a server that stops answering raises `VLLMServerError` naming its URL, after one retry (TRL retries a refused
  connection for about a minute, and re-posting a weight update to a server that died in it cannot succeed).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from . import vllm_gloo, weight_fingerprint

logger = logging.getLogger(__name__)


def address_towards(host: str) -> str:
    """This machine's address on its route to `host`: where a server there can reach the trainer. (vLLM's `get_ip()`
    takes the route to a public address instead, which a cluster's private network may not have: it then says
    0.0.0.0, and the server's workers would look for the trainer on their own node.)"""
    family, kind, _, _, target = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]  # any port: nothing is sent
    with socket.socket(family, kind) as s:
        s.connect(target)  # UDP: picks the route and the source address, sends nothing
        return s.getsockname()[0]


class VLLMServerError(ConnectionError):
    """A vLLM server of the run stopped answering (or broke off a weight transfer)."""


def server_backend(server_info: dict) -> str | None:
    """The weight-transfer backend a server reports in `/server_info` (None: it has none)."""
    config = server_info.get("weight_transfer_config")
    return config.get("backend") if isinstance(config, dict) else None


@functools.cache
def server_client_class():
    """`ServerClient`: TRL's `VLLMClient` with the gloo backend and errors that name the server (module docstring).
    Built on first use: TRL's client module imports requests and vLLM helpers."""
    import requests
    from requests.adapters import HTTPAdapter
    from trl.generation.vllm_client import VLLMClient
    from urllib3.util.retry import Retry

    class ServerClient(VLLMClient):
        def __init__(self, *args, **kwargs):
            self._gloo = None  # (group, store) once a gloo server joined
            self._fingerprints = None  # whether the server gives weight fingerprints (None: not asked yet)
            super().__init__(*args, **kwargs)
            # TRL's session retries a refused or dropped connection 5 times with exponential backoff (about a
            # minute); a run whose server died should say so at once. One retry each still covers a pooled
            # keep-alive connection the server closed; server errors (5xx) keep TRL's retries.
            retry = Retry(total=5, connect=1, read=1, status=3, backoff_factor=2, status_forcelist=[500, 502, 503],
                          allowed_methods=["POST", "GET"])  # fmt: skip
            adapter = HTTPAdapter(max_retries=retry, pool_maxsize=64)
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)

        def _unreachable(self, what: str, error: Exception) -> VLLMServerError:
            return VLLMServerError(
                f"The vLLM server at {self.base_url} stopped answering ({what}: {type(error).__name__}): it has "
                "exited or its node is unreachable. Check its log; restart it (and the run) to continue."
            )

        def _get(self, url: str, **kwargs) -> dict:
            try:
                return super()._get(url, **kwargs)
            except requests.RequestException as e:
                raise self._unreachable(url.removeprefix(self.base_url), e) from e

        def _post(self, url: str, **kwargs) -> dict:
            try:
                return super()._post(url, **kwargs)
            except requests.RequestException as e:
                raise self._unreachable(url.removeprefix(self.base_url), e) from e

        def get_server_info(self) -> dict:
            try:
                return super().get_server_info()
            except requests.RequestException as e:
                raise self._unreachable("/server_info", e) from e

        def init_communicator(self, device=0):
            if server_backend(self.get_server_info()) != vllm_gloo.BACKEND:
                return super().init_communicator(device=device)  # NCCL (or TRL's message for a server without one)
            # The trainer is rank 0 and hosts the rendezvous; the server's workers join as ranks 1.. (as with NCCL),
            # at this machine's address on the route to the server (VLLM_HOST_IP, vLLM's own setting, overrides it).
            address = os.environ.get("VLLM_HOST_IP") or address_towards(self.host)
            init_info = {"master_address": address, "master_port": self.group_port, "rank_offset": 1,
                         "world_size": self.get_world_size() + 1}  # fmt: skip
            executor = ThreadPoolExecutor(max_workers=1)  # the server blocks in the rendezvous meanwhile
            future = executor.submit(
                self._post, f"{self.base_url}/init_weight_transfer_engine", json={"init_info": init_info}
            )
            try:
                self._gloo = vllm_gloo.open_group(address, self.group_port, 0, init_info["world_size"])
            except Exception as e:
                # e.g. the group port is taken: the server waits for a rendezvous that will not come, so do not
                # wait for its answer (it gives up after the rendezvous timeout)
                executor.shutdown(wait=False)
                raise RuntimeError(
                    f"Could not open the weight-transfer group for the vLLM server at {self.base_url} on port "
                    f"{self.group_port} (vllm_group_port; server i of several uses vllm_group_port + i): {e}"
                ) from e
            future.result()
            executor.shutdown()
            atexit.register(self.close_communicator)

        def update_named_params(self, metadata: list, named_params: Iterator[tuple[str, torch.Tensor]]) -> None:
            if self._gloo is None:
                return super().update_named_params(metadata, named_params)
            names, dtypes, shapes = (list(field) for field in zip(*metadata, strict=True))
            update_info = {"names": names, "dtype_names": dtypes, "shapes": shapes}
            if not self._updating_weights:
                self._start_weight_update()
            with ThreadPoolExecutor(max_workers=1) as executor:  # the server receives inside this request
                future = executor.submit(
                    self._post, f"{self.base_url}/update_weights", json={"update_info": update_info}
                )
                try:
                    vllm_gloo.send(self._gloo[0], named_params, metadata)
                except RuntimeError as e:  # gloo: the peer closed the connection
                    raise self._unreachable("weight transfer", e) from e
                future.result()
            if not self._updating_weights:
                self._finish_weight_update()

        def prompt_logprobs(self, ids: list[int]) -> list[float]:
            """The server's log-probs of ids[1:] given their prefixes (vLLM's `prompt_logprobs`: raw logits, no
            temperature), through its OpenAI completions endpoint: TRL's `generate` does not return them."""
            payload = {"model": self.model, "prompt": [ids], "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0}
            positions = self._post(f"{self.base_url}/v1/completions", json=payload)["choices"][0]["prompt_logprobs"]
            return [lp[str(token)]["logprob"] for token, lp in zip(ids[1:], positions[1:])]

        def weight_fingerprint(self) -> list | None:
            """Every engine's weight fingerprint (`weight_fingerprint.engine_fingerprint`) through the server's
            `/collective_rpc`, or None where the server cannot make one: no worker extension (e.g. started by `trl
            vllm-serve`), quantized or tensor-parallel weights. Not retried: a server without it answers at once."""
            if self._fingerprints is False:
                return None
            body = {"method": weight_fingerprint.RPC_METHOD}
            try:
                response = requests.post(f"{self.base_url}/collective_rpc", json=body, timeout=300)
            except requests.RequestException as e:
                raise self._unreachable("/collective_rpc", e) from e
            result = weight_fingerprint.worker_fingerprints(response.json().get("results")) if response.ok else None
            if result is None and self._fingerprints is None:
                logger.warning("The vLLM server at %s gives no weight fingerprints (%s): its sync is checked by "
                               "log-probs only. Start it with `epo-trl vllm-serve`.", self.base_url,
                               f"HTTP {response.status_code}" if not response.ok else "not for these weights")  # fmt: skip
            self._fingerprints = result is not None
            return result

        def close_communicator(self):
            self._gloo = None
            super().close_communicator()

    return ServerClient


def install_server_client() -> None:
    """Make TRL's `VLLMGeneration` build a `ServerClient` for its server (module docstring). Idempotent."""
    from trl.generation import vllm_client, vllm_generation

    # only over TRL's own class: a test's stand-in client (tests/vllm_standin.py) stays as it is
    if vllm_generation.VLLMClient is vllm_client.VLLMClient:
        vllm_generation.VLLMClient = server_client_class()


install_server_client()


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

    def prompt_logprobs(self, ids: list[int]) -> list[list[float]]:
        """Every server's `prompt_logprobs(ids)` (the weight-sync probe checks each one: one stale server is enough)."""
        return [f.result() for f in [self._executor.submit(c.prompt_logprobs, ids) for c in self.clients]]

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

    def weight_fingerprint(self) -> list | None:
        """Every server's engines' fingerprints, or None if any server gives none (then the probe checks them)."""
        if not all(hasattr(c, "weight_fingerprint") for c in self.clients):  # e.g. a test's stand-in client
            return None
        results = [f.result() for f in [self._executor.submit(c.weight_fingerprint) for c in self.clients]]
        return None if any(r is None for r in results) else [fp for r in results for fp in r]

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
