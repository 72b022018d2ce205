"""A stand-in for vLLM behind TRL 1.16's REAL `VLLMGeneration` (vLLM cannot be installed on these machines).

Only what vLLM itself provides is replaced: `vllm.LLM` (colocate), `vllm.SamplingParams` and TRL's HTTP
`VLLMClient` (server mode). Everything TRL does around them runs unchanged — the trainer's construction of
`VLLMGeneration`, `sync_weights` (parameter iteration, ZeRO-3 gathers, server metadata), sleep/wake, the
colocate tensor-parallel all-gather and slicing, the server-mode gather/broadcast/slice and `extract_logprobs`.

The engine behind both holds its OWN copy of the policy's weights, changed only by what TRL pushes
(`load_weights` / `update_named_params`), and samples from that copy. So a missing or stale weight sync shows up
as samples from old weights and as checksums that differ from the trainer's; `engine.events` records the order of
syncs, sleeps, wakes and generates. A scripted `policy(prompt_ids) -> completion_ids` can replace the model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import trl.generation.vllm_generation as vllm_generation

from epo_trl.rollout.backends.base import eos_token_ids


def checksum(tensor: torch.Tensor) -> float:
    """A parameter fingerprint: sum and a position-weighted sum (catches permuted or partially stale values)."""
    flat = tensor.detach().double().flatten()
    return round(flat.sum().item() + (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum().item(), 6)


def model_checksums(model) -> dict[str, float]:
    return {name: checksum(p) for name, p in model.named_parameters()}


# --- vLLM's output types (the attributes TRL reads) ------------------------------------------------------------
@dataclass
class Logprob:
    logprob: float
    rank: int  # 1-based, as vLLM


@dataclass
class CompletionOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    index: int = 0


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class SamplingParams:
    """vLLM's keyword-only constructor; unknown keys are an error, as in vLLM."""

    FIELDS = dict(
        n=1, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=16, logprobs=None,
        min_tokens=0, ignore_eos=False, prompt_logprobs=None,
    )  # fmt: skip

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(self.FIELDS) - {"structured_outputs", "seed", "stop_token_ids"}
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        for key, default in self.FIELDS.items():
            setattr(self, key, kwargs.get(key, default))


# --- the engine: weights + sampler -----------------------------------------------------------------------------
@dataclass
class Engine:
    model_path: str | None = None
    policy: object = None
    seed: int = 0
    events: list[tuple] = field(default_factory=list)
    synced: list[dict[str, float]] = field(default_factory=list)  # one {name: checksum} per completed push
    temperatures: list[float] = field(default_factory=list)  # the sampling temperature of every sampling generate

    def __post_init__(self):
        self.model = self.tokenizer = None
        self.weights_discarded = False
        self._incoming: dict[str, float] = {}
        self.generator = torch.Generator().manual_seed(self.seed)
        if self.policy is None and self.model_path is not None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            self.eos_ids = set(eos_token_ids(self.tokenizer, self.model))
            self.params = dict(self.model.named_parameters())

    # weight loading (vLLM's model.load_weights / the server's update_named_param)
    def load_weights(self, weights) -> None:
        for name, tensor in weights:
            self._incoming[name] = checksum(tensor)
            if self.model is not None:
                if name not in self.params:
                    raise KeyError(f"vLLM has no parameter {name!r}: TRL sent a name vLLM cannot load")
                with torch.no_grad():
                    self.params[name].copy_(tensor.to(self.params[name].dtype))

    def reset_prefix_cache(self) -> None:
        # TRL ends every weight push with reset_prefix_cache(): the push is complete.
        if self._incoming:
            if self.model is not None and set(self._incoming) != set(self.params):
                raise RuntimeError(f"partial weight push: {sorted(set(self.params) - set(self._incoming))} missing")
            self.synced.append(self._incoming)
            self.events.append(("sync", len(self.synced) - 1))
            self._incoming = {}
            self.weights_discarded = False
        self.events.append(("reset_prefix_cache",))

    # sampling
    def complete(self, prompt_ids: list[int], params: SamplingParams) -> CompletionOutput:
        if self.weights_discarded:
            raise RuntimeError("generate after sleep(level=2) without re-pushing the weights: vLLM would emit garbage")
        if self.model is None:
            return self._scripted(prompt_ids, params)
        ids, positions = list(prompt_ids), []
        with torch.no_grad():
            for _ in range(params.max_tokens):
                logits = self.model(torch.tensor([ids])).logits[0, -1].double()
                temperature = params.temperature
                # logprobs_mode="processed_logprobs" (TRL sets it): log-probs after temperature scaling
                logps = torch.log_softmax(logits / max(temperature, 1e-6), dim=-1)
                if temperature == 0:
                    token = int(logps.argmax())
                else:
                    token = int(torch.multinomial(logps.exp(), 1, generator=self.generator))
                positions.append(self._candidates(logps, token, params.logprobs))
                ids.append(token)
                if token in self.eos_ids and not params.ignore_eos and len(positions) >= params.min_tokens:
                    break
        completion = ids[len(prompt_ids) :]
        return CompletionOutput(completion, positions if params.logprobs is not None else None)

    @staticmethod
    def _candidates(logps: torch.Tensor, token: int, k: int | None) -> dict[int, Logprob]:
        """vLLM's per-position dict: the top-k tokens plus the sampled one, each with its 1-based rank."""
        order = torch.argsort(logps, descending=True).tolist()
        out = {t: Logprob(float(logps[t]), r + 1) for r, t in enumerate(order[: k or 0])}
        out[token] = Logprob(float(logps[token]), order.index(token) + 1)
        return out

    def _scripted(self, prompt_ids, params) -> CompletionOutput:
        completion = list(self.policy(prompt_ids))[: params.max_tokens]
        if params.logprobs is None:
            return CompletionOutput(completion, None)
        # The sampled token is ranked 2nd behind a decoy whenever top-k candidates are asked for (k >= 1).
        decoy = {-1: Logprob(-0.1, 1)} if params.logprobs else {}
        return CompletionOutput(completion, [{**decoy, t: Logprob(-0.5, 2 if decoy else 1)} for t in completion])

    def generate_many(self, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        self.events.append(("generate", len(prompts)))
        if params.prompt_logprobs is None:  # a scoring request (the sync check's probe) samples nothing trained on
            self.temperatures.append(params.temperature)
        return [
            RequestOutput(
                list(p), [self.complete(p, params) for _ in range(params.n)], self._prompt_logprobs(p, params)
            )
            for p in prompts
        ]

    def _prompt_logprobs(self, prompt_ids: list[int], params: SamplingParams):
        """vLLM's `prompt_logprobs`: None for the first token, then each token's log-prob given its prefix, from the
        raw logits (no temperature, as vLLM computes them)."""
        if params.prompt_logprobs is None:
            return None
        if self.model is None:
            raise RuntimeError("a scripted stand-in engine has no weights to score a prompt with")
        with torch.no_grad():
            logps = torch.log_softmax(self.model(torch.tensor([prompt_ids])).logits[0, :-1].double(), dim=-1)
        return [None] + [{t: Logprob(float(logps[i, t]), 1)} for i, t in enumerate(prompt_ids[1:])]


# --- vllm.LLM (colocate) and trl's VLLMClient (server) ----------------------------------------------------------
class StandIn:
    """The registry the patched classes report to: every engine made during the context."""

    def __init__(self, model_path: str | None, policy):
        self.model_path, self.policy = model_path, policy
        self.engines: list[Engine] = []

    def new_engine(self, model_path: str | None, seed: int) -> Engine:
        engine = Engine(model_path or self.model_path, self.policy, seed)
        self.engines.append(engine)
        return engine


_ACTIVE: StandIn | None = None


class FakeLLM:
    """`vllm.LLM` as TRL's colocate mode uses it."""

    def __init__(self, model: str, seed: int = 0, enable_sleep_mode: bool = False, **kwargs):
        self.engine = _ACTIVE.new_engine(model, seed)
        self.enable_sleep_mode = enable_sleep_mode
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self.engine.load_weights))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        )

    def generate(self, prompts: list[dict], sampling_params: SamplingParams, use_tqdm: bool = False):
        return self.engine.generate_many([p["prompt_token_ids"] for p in prompts], sampling_params)

    def sleep(self, level: int = 1) -> None:
        assert self.enable_sleep_mode, "vLLM only sleeps when built with enable_sleep_mode=True"
        self.engine.events.append(("sleep", level))
        if level == 2:
            self.engine.weights_discarded = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.engine.events.append(("wake_up", tuple(tags or ())))

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()


class FakeVLLMClient:
    """TRL's `VLLMClient` talking to a `trl vllm-serve` process; the server's engine lives in this object."""

    def __init__(self, base_url: str | None = None, group_port: int = 51216, connection_timeout: float = 0.0, **kw):
        self.base_url = base_url
        self.engine = _ACTIVE.new_engine(None, 0)
        self.communicator_ready = False

    def init_communicator(self, device=None) -> None:
        self.communicator_ready = True

    def get_server_info(self) -> dict:
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def generate(self, prompts, features=None, n=1, logprobs=0, max_tokens=16, temperature=1.0, **sampling) -> dict:
        sampling = {**sampling, **(sampling.pop("generation_kwargs", None) or {})}  # the server merges them
        sampling = {k: v for k, v in sampling.items() if k in SamplingParams.FIELDS}
        params = SamplingParams(n=n, logprobs=logprobs, max_tokens=max_tokens, temperature=temperature, **sampling)
        outputs = self.engine.generate_many(prompts, params)
        completions = [o for out in outputs for o in out.outputs]
        logprobs_out, token_ids = vllm_generation.extract_logprobs(outputs)
        return {
            "prompt_ids": [out.prompt_token_ids for out in outputs],
            "completion_ids": [o.token_ids for o in completions],
            "logprobs": logprobs_out,
            "logprob_token_ids": token_ids,
        }

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """`ServerClient.prompt_logprobs`: the server's log-probs of ids[1:] (its completions endpoint)."""
        (out,) = self.engine.generate_many([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))
        return [lp[token].logprob for token, lp in zip(ids[1:], out.prompt_logprobs[1:])]

    def update_named_params(self, metadata, params) -> None:
        assert self.communicator_ready, "weights sent before init_communicator"
        received = [(name, tensor) for name, tensor in params]
        sent = [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in received]
        if [tuple(m) for m in metadata] != sent:
            raise RuntimeError("the server was announced other tensors than it received (metadata mismatch)")
        self.engine.load_weights(received)

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()


@contextlib.contextmanager
def vllm_standin(model_path: str | None = None, policy=None):
    """Make TRL believe vLLM is installed; yield the registry of engines created inside the context.

    `model_path`: the model the SERVER loads (colocate engines load the trainer's own `model.name_or_path`).
    `policy`: a scripted `policy(prompt_ids) -> completion_ids` instead of sampling from the weights.
    """
    global _ACTIVE
    names = ("is_vllm_available", "LLM", "SamplingParams", "VLLMClient")
    saved = {n: getattr(vllm_generation, n, None) for n in names}
    _ACTIVE = StandIn(model_path, policy)
    vllm_generation.is_vllm_available = lambda *a, **k: True
    vllm_generation.LLM, vllm_generation.SamplingParams = FakeLLM, SamplingParams
    vllm_generation.VLLMClient = FakeVLLMClient
    try:
        yield _ACTIVE
    finally:
        for name, value in saved.items():
            if value is None:
                vars(vllm_generation).pop(name, None)
            else:
                setattr(vllm_generation, name, value)
        _ACTIVE = None


def make_vllm_generation(model, accelerator, tokenizer, **kwargs):
    """TRL's real `VLLMGeneration` over the stand-in (call inside `vllm_standin()`), for tests without a trainer."""
    return vllm_generation.VLLMGeneration(model=model, accelerator=accelerator, processing_class=tokenizer, **kwargs)
