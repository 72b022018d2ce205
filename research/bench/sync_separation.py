"""Does the weight-sync probe separate a stale engine from numerical noise? (colocate and server, real CPU vLLM)

For each model the trainer's weights move by ONE optimizer step (AdamW at the model's recipe learning rate, on a
maze prompt, not on the probe), then the engine is brought to one of these states and probed as `SyncCheck` probes it
(PROBE_TOKENS sampled after the probe text at temperature 1, scored by the trainer):

- correct: the new weights pushed in full (colocate: `push_cpu_colocate`; server: the gloo transfer of
  `epo-trl vllm-serve`);
- no-op push: the engine keeps the old weights;
- tied head not re-packed (colocate): vLLM's reload without `repack_tied_head`, CPU vLLM's own defect; a server runs
  the same reload inside its engine (`GlooWeightTransferEngine.finish_weight_update`), so it is not repeated there;
- one layer skipped: every tensor pushed except those of the middle decoder layer.

Each state is probed `SAMPLES` times (different sampled completions); **separation** = the smallest gap of a stale
state / the largest gap after a correct push. One step is the hardest case: the gap of a stale engine grows with
every step it misses.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

SAMPLES = 6
STEPS = (1, 3, 10)  # optimizer steps the trainer is ahead of a stale engine
MODELS = {  # name -> recipe learning rate (recipes/cpu/maze_epo_vllm.yaml, recipes/cpu/demo_llm.yaml)
    "tiny": 5.0e-4,
    "SmolLM2-135M-Instruct": 2.0e-5,
}
TRAIN_TEXT = "You are in a maze. You see a key to the east and a door to the north. Your action: go east"


def _gaps(model, probe: list[int], samples: list[tuple[list[int], list[float]]]) -> list[float]:
    """Mean |engine - trainer| log-prob of each sampled completion (SyncCheck's statistic)."""
    import torch

    out = []
    with torch.no_grad():
        for ids, theirs in samples:
            logits = model(torch.tensor([probe + ids])).logits[0, len(probe) - 1 : -1].float()
            mine = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids).view(-1, 1)).squeeze(1)
            out.append((mine - torch.tensor(theirs)).abs().mean().item())
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _middle_layer(model) -> str:
    return f"model.layers.{model.config.num_hidden_layers // 2}."


class _Colocate:
    def __init__(self, path: str, dtype: str):
        from .vllm_cpu import in_process_llm

        self.llm, _ = in_process_llm(path, dtype)
        self.runner = self.llm.llm_engine.model_executor.driver_worker.model_runner

    def push(self, named, skip: str | None = None, repack: bool = True) -> None:
        from epo_trl.trainers.vllm_sync import repack_tied_head

        tensors = ((n, t) for n, t in named if not (skip and n.startswith(skip)))
        self.runner.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)
        if repack:
            repack_tied_head(self.runner.get_model())
        self.llm.reset_prefix_cache()

    def sample(self, probe: list[int], n: int, tokens: int):
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=1.0, max_tokens=tokens, min_tokens=tokens, logprobs=0,
                                ignore_eos=True, seed=0)  # fmt: skip
        outs = self.llm.generate([{"prompt_token_ids": probe}], params, use_tqdm=False)[0].outputs
        return [(list(o.token_ids), [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]) for o in outs]

    def close(self) -> None:
        self.llm = self.runner = None


class _Server:
    def __init__(self, path: str, dtype: str, log):
        import urllib.request

        from epo_trl.cli.vllm_serve import server_command, server_env
        from epo_trl.trainers.vllm_servers import server_client_class

        port = free_port()
        argv = ["--model", path, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
                "--enable_prefix_caching", "true"]  # fmt: skip
        env = server_env()
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.proc = subprocess.Popen(server_command(argv), env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 900
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode} (log: {log.name})")
            if time.time() > deadline:
                raise RuntimeError(f"vLLM server not healthy after 900 s (log: {log.name})")
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(2)
        self.client = server_client_class()(base_url=url, group_port=free_port(), connection_timeout=60)
        self.client.init_communicator(device="cpu")

    def push(self, named, skip: str | None = None, repack: bool = True) -> None:
        named = [(n, t) for n, t in named if not (skip and n.startswith(skip))]
        meta = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in named]
        self.client.update_named_params(meta, iter(named))
        self.client.reset_prefix_cache()

    def sample(self, probe: list[int], n: int, tokens: int):
        out = self.client.generate(prompts=[probe], n=n, temperature=1.0, max_tokens=tokens, logprobs=0,
                                   generation_kwargs={"ignore_eos": True, "min_tokens": tokens})  # fmt: skip
        return [(ids, [c[0] for c in lps]) for ids, lps in zip(out["completion_ids"], out["logprobs"])]

    def close(self) -> None:
        self.client.close_communicator()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _measure(name: str, path: str, engine_dtype: str, lr: float, mode: str, samples: int, steps, log) -> list[dict]:
    """One row per number of optimizer steps the trainer is ahead of the engine's old weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from epo_trl.trainers.vllm_sync import PROBE_TOKENS, probe_ids

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # the trainer's fp32 master weights
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = probe_ids(tokenizer)
    t0 = time.perf_counter()
    engine = _Colocate(path, engine_dtype) if mode == "colocate" else _Server(path, engine_dtype, log)
    start_s = time.perf_counter() - t0
    skip = _middle_layer(model)
    cases = {
        "correct": dict(),
        "no-op push": None,
        "tied head not re-packed": dict(repack=False) if mode == "colocate" else "n/a",
        "one layer skipped": dict(skip=skip),
    }
    rows, done = [], 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = torch.tensor([tokenizer(TRAIN_TEXT, add_special_tokens=False)["input_ids"]])
    try:
        for k in steps:
            while done < k:  # the trainer moves on; a stale engine misses every one of these steps
                model(ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done += 1
            after = {n: p.detach().clone() for n, p in model.named_parameters()}
            gaps: dict[str, list[float] | str] = {}
            for case, how in cases.items():
                if how == "n/a":
                    gaps[case] = "n/a"
                    continue
                engine.push(list(before.items()))  # the engine at the old weights
                if how is not None:
                    engine.push(list(after.items()), **how)
                gaps[case] = _gaps(model, probe, engine.sample(probe, samples, PROBE_TOKENS))
            correct = max(gaps["correct"])
            stale = [min(v) for c, v in gaps.items() if c != "correct" and isinstance(v, list)]
            rows.append({
                "model": name, "mode": mode, "dtype": engine_dtype, "lr": lr, "steps": k, "start_s": start_s,
                "skipped_layer": skip.rstrip("."), "gaps": gaps, "correct_max": correct,
                "separation": min(stale) / correct if correct > 0 else float("inf"),
            })  # fmt: skip
    finally:
        engine.close()
    return rows


def run(quick: bool = False, smoke: bool = False) -> dict:
    from epo_trl.hardware import cpu_native_bf16

    from .common import maze_model

    samples = 2 if smoke else SAMPLES
    rows = []
    with tempfile.TemporaryDirectory() as tmp, open(f"{tmp}/servers.log", "w") as log:
        tiny, _, _ = maze_model(tmp, hidden_size=64, head_dim=32)
        models = [("tiny", tiny, "float32")]
        if not smoke:
            try:
                from epo_trl.models.smollm2 import build_smollm2

                # bf16 where the CPU multiplies bf16 in hardware (what the recipe's engine gets there), else fp32
                dtype = "bfloat16" if cpu_native_bf16() else "float32"
                models.append(("SmolLM2-135M-Instruct", build_smollm2(), dtype))
            except Exception as e:  # the wheel is an optional extra
                rows.append({"model": "SmolLM2-135M-Instruct", "skipped": f"{type(e).__name__}: {e}"})
        for name, path, dtype in models:
            for mode in ("colocate", "server"):
                print(f"[sync_separation] {name} {mode} ...", file=sys.stderr, flush=True)
                rows += _measure(name, path, dtype, MODELS[name], mode, samples, (1,) if smoke else STEPS, log)
    return {"samples": samples, "rows": rows}


def to_markdown(results: dict) -> str:
    from .common import md_table

    header = ["model", "engine dtype", "mode", "steps behind", "correct push (max)", "no-op push (min)",
              "tied head not re-packed (min)", "one layer skipped (min)", "separation (worst stale ÷ correct)"]  # fmt: skip
    table = []
    for row in results["rows"]:
        if "skipped" in row:
            table.append([row["model"], "-", "-", "-", f"skipped: {row['skipped']}", "", "", "", ""])
            continue
        g = row["gaps"]

        def cell(case, pick=min, g=g):
            return g[case] if isinstance(g[case], str) else f"{pick(g[case]):.3g}"

        table.append([row["model"], row["dtype"], row["mode"], row["steps"], cell("correct", max), cell("no-op push"),
                      cell("tied head not re-packed"), cell("one layer skipped"), f"{row['separation']:.1f}x"])  # fmt: skip
    return md_table(header, table) + (
        f"\n\nMean |Δ log p| (nats) of {results['samples']} probe samples per state, the trainer `steps behind` AdamW "
        "steps ahead of the engine's old weights at the recipe learning rate (tiny 5e-4, SmolLM2 2e-5)."
    )


if __name__ == "__main__":  # python -m research.bench.sync_separation: the table alone
    print(to_markdown(run(quick="--quick" in sys.argv, smoke="--smoke" in sys.argv)))
