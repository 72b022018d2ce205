"""Does the weight-sync check separate a stale engine from numerical noise? (colocate and server, real CPU vLLM)

For each model the trainer's weights (fp32 master weights) move by 1, 3 or 10 optimizer steps (AdamW at the model's
recipe learning rate, on a maze prompt, not on the probe), then the engine is brought to one of these states:

- correct: the new weights pushed in full (colocate: `push_cpu_colocate`; server: the gloo transfer of
  `epo-trl vllm-serve`);
- no-op push: the engine keeps the old weights;
- tied head not re-packed (colocate): vLLM's reload without `repack_tied_head`, CPU vLLM's own defect; a server runs
  the same reload inside its engine (`GlooWeightTransferEngine.finish_weight_update`), so it is not repeated there;
- one layer skipped: every tensor pushed except those of the middle decoder layer.

Each state is checked as `SyncCheck` checks it: the engine's log-probs of `PROBE_TEXT` (teacher-forced, vLLM's
`prompt_logprobs`) against the trainer's in the engine's precision; the statistic is their mean gap over the gap
right after a full push of the old weights (the run's first push), `gap_ratio`. **separation** = the smallest ratio
of a stale state / the ratio after the correct push. The **stale effect** is how far the stale engine's own log-probs
are from the correct engine's (mean |Δ|, nats): the size of what any log-prob probe can see of that staleness.

The check's second part compares the weights themselves (`weight_fingerprint`): per layer group, sums of the columns
the engine's own kernels return for unit inputs, against the trainer's weights cast to the engine's dtype. Its
statistic is the worst group's relative mismatch (`FINGERPRINT_TOL` = 1e-10); **fingerprint separation** = the
smallest stale mismatch / the correct push's (floored at float64's epsilon, 2.2e-16: a correct push often reads 0).

The previous check (8 tokens sampled after a short text at temperature 1, mean |engine - trainer| over
them, against an absolute tolerance) is measured next to it (`old_*`, six samples per state): its separation is the
smallest stale gap / the largest correct gap.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

SAMPLES = 6  # sampled completions per state for the previous check
STEPS = (1, 3, 10)  # optimizer steps the trainer is ahead of a stale engine
MODELS = {  # name -> recipe learning rate (recipes/cpu/maze_epo_vllm.yaml, recipes/cpu/demo_llm.yaml)
    "tiny": 5.0e-4,
    "SmolLM2-135M-Instruct": 2.0e-5,
}
TRAIN_TEXT = "You are in a maze. You see a key to the east and a door to the north. Your action: go east"
OLD_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Go north, then open the door."  # the previous check's
OLD_PROBE_TOKENS = 8
STALE = ("no-op push", "tied head not re-packed", "one layer skipped")


def _old_gaps(model, probe: list[int], samples: list[tuple[list[int], list[float]]]) -> list[float]:
    """The previous check's statistic: mean |engine - trainer| log-prob of each sampled completion (fp32 trainer)."""
    import torch

    out = []
    with torch.no_grad():
        for ids, theirs in samples:
            logits = model(torch.tensor([probe + ids])).logits[0, len(probe) - 1 : -1].float()
            mine = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids).view(-1, 1)).squeeze(1)
            out.append((mine - torch.tensor(theirs)).abs().mean().item())
    return out


def _stats(e, t, e0, t0) -> dict[str, float]:
    """One engine state `e` against the trainer `t`, with both sides' scores (e0, t0) right after the full push of the
    old weights: the check's `ratio` and, for the record, the gap and two relative statistics that were tried."""
    from epo_trl.trainers.vllm_sync import gap_ratio

    de, dt = e - e0, t - t0
    gap = (e - t).abs().mean().item()
    return {
        "gap": gap,  # mean |engine - trainer|, nats
        "ratio": gap_ratio(gap, (e0 - t0).abs().mean().item()),  # SyncCheck's statistic
        "share": ((de - dt).abs().mean() / dt.abs().mean()).item(),  # share of the trainer's move the engine missed
        "alpha": ((de * dt).sum() / (dt * dt).sum()).item(),  # the engine's move projected on the trainer's
    }


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

    def score(self, ids: list[int]):
        from vllm import SamplingParams

        from epo_trl.trainers.vllm_sync import colocate_forced_logps

        return colocate_forced_logps(self.llm, ids, SamplingParams)

    def fingerprint(self) -> dict:
        from epo_trl.trainers.weight_fingerprint import engine_fingerprint

        return self.llm.apply_model(engine_fingerprint)[0]

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

    def score(self, ids: list[int]):
        from epo_trl.trainers.vllm_sync import server_forced_logps

        return server_forced_logps(self.client, ids)[0]

    def fingerprint(self) -> dict:
        return self.client.weight_fingerprint()[0]

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

    from epo_trl.trainers.vllm_sync import probe_ids, trainer_probe_logps
    from epo_trl.trainers.weight_fingerprint import FINGERPRINT_TOL, mismatches, trainer_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # the trainer's fp32 master weights
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_probe = tokenizer(OLD_PROBE_TEXT, add_special_tokens=False)["input_ids"][:32]
    probe = torch.tensor([probe_ids(tokenizer)])
    # "check": scored as SyncCheck scores (in the engine's precision); "fp32 scoring": a bf16 engine against the
    # trainer's fp32 forward, for the record (the gap then drifts as the weights move: why the check does not)
    dtype = getattr(torch, engine_dtype)
    variants = {"check": dtype, **({"fp32 scoring": None} if dtype != torch.float32 else {})}

    def trainer_scores():
        return {v: trainer_probe_logps(model, probe, d) for v, d in variants.items()}

    trainer_before = trainer_scores()
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
        engine.push(list(before.items()))  # the run's first push: a full reload of what the engine holds
        engine_before = engine.score(probe[0].tolist())
        for k in steps:
            while done < k:  # the trainer moves on; a stale engine misses every one of these steps
                model(ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done += 1
            after = {n: p.detach().clone() for n, p in model.named_parameters()}
            trainer_after = trainer_scores()
            old: dict[str, list[float] | str] = {}
            stats: dict[str, dict] = {v: {} for v in variants}
            scores = {}
            mine = trainer_fingerprint(model, dtype)
            fingerprint: dict[str, dict] = {}
            for case, how in cases.items():
                if how == "n/a":
                    old[case] = "n/a"
                    continue
                engine.push(list(before.items()))  # the engine at the old weights
                if how is not None:
                    engine.push(list(after.items()), **how)
                old[case] = _old_gaps(model, old_probe, engine.sample(old_probe, samples, OLD_PROBE_TOKENS))
                scores[case] = engine.score(probe[0].tolist())
                groups = mismatches(engine.fingerprint(), mine)
                fingerprint[case] = {"worst": max(groups.values()), "groups": len(groups),
                                     "stale": sorted(g for g, m in groups.items() if m > FINGERPRINT_TOL)}  # fmt: skip
                for v in variants:
                    stats[v][case] = _stats(scores[case], trainer_after[v], engine_before, trainer_before[v])
            effect = {case: (scores[case] - scores["correct"]).abs().mean().item() for case in scores}
            old_stale = [min(old[c]) for c in STALE if isinstance(old[c], list)]
            rows.append({
                "model": name, "mode": mode, "dtype": engine_dtype, "lr": lr, "steps": k, "start_s": start_s,
                "skipped_layer": skip.rstrip("."), "probe_tokens": probe.shape[1] - 1,
                "reference_gap": (engine_before - trainer_before["check"]).abs().mean().item(),
                "move": (trainer_after["check"] - trainer_before["check"]).abs().mean().item(),
                "stats": stats, "effect": effect, "fingerprint": fingerprint,
                "old_gaps": old, "old_separation": min(old_stale) / max(old["correct"]),
            })  # fmt: skip
    finally:
        engine.close()
    return rows


def run(quick: bool = False, smoke: bool = False) -> dict:
    from epo_trl.hardware import cpu_native_bf16

    from .common import maze_model

    samples = 2 if smoke else SAMPLES
    rows = []
    # bf16 where the CPU multiplies bf16 in hardware (what vLLM's "auto" gives a fp32 checkpoint there), else fp32
    half = "bfloat16" if cpu_native_bf16() else "float32"
    with tempfile.TemporaryDirectory() as tmp, open(f"{tmp}/servers.log", "w") as log:
        tiny, _, _ = maze_model(tmp, hidden_size=64, head_dim=32)
        models = [("tiny", tiny, "float32")] + ([] if smoke or half == "float32" else [("tiny", tiny, half)])
        if not smoke:
            try:
                from epo_trl.models.smollm2 import build_smollm2

                models.append(("SmolLM2-135M-Instruct", build_smollm2(), half))
            except Exception as e:  # the wheel is an optional extra
                rows.append({"model": "SmolLM2-135M-Instruct", "skipped": f"{type(e).__name__}: {e}"})
        for name, path, dtype in models:
            for mode in ("colocate", "server"):
                print(f"[sync_separation] {name} {dtype} {mode} ...", file=sys.stderr, flush=True)
                rows += _measure(name, path, dtype, MODELS[name], mode, samples, (1,) if smoke else STEPS, log)
    return {"samples": samples, "rows": rows}


def _ratios(row: dict) -> dict[str, float]:
    """The check's statistic per state, recomputed from the measured gaps with the current `gap_ratio`."""
    from epo_trl.trainers.vllm_sync import gap_ratio

    return {c: gap_ratio(st["gap"], row["reference_gap"], row["move"]) for c, st in row["stats"]["check"].items()}


def _times(x: float) -> str:
    return f"{x:.1e}x" if x >= 1e6 else f"{x:,.0f}x" if x >= 100 else f"{x:.1f}x"


def separation(row: dict) -> float:
    """The smallest stale ratio over the correct push's."""
    ratio = _ratios(row)
    return min(ratio[c] for c in STALE if c in ratio) / ratio["correct"]


EPS = 2.220446049250313e-16  # float64 epsilon: a correct push's fingerprint mismatch often reads exactly 0


def fingerprint_separation(row: dict) -> float | None:
    """The smallest stale fingerprint mismatch over the correct push's (None: not measured in this row)."""
    fp = row.get("fingerprint")
    if not fp:
        return None
    return min(fp[c]["worst"] for c in STALE if c in fp) / max(fp["correct"]["worst"], EPS)


def caught(row: dict) -> dict[str, bool]:
    """Each stale state -> whether the check (probe ratio or fingerprints, at their defaults) stops it; and whether the
    correct push passes both (key "correct")."""
    from epo_trl.trainers.vllm_sync import DEFAULT_SYNC_TOLERANCE
    from epo_trl.trainers.weight_fingerprint import FINGERPRINT_TOL

    ratio, fp = _ratios(row), row.get("fingerprint") or {}
    out = {c: ratio[c] > DEFAULT_SYNC_TOLERANCE or (c in fp and fp[c]["worst"] > FINGERPRINT_TOL) for c in ratio}
    out["correct"] = not out["correct"]
    return out


def verdict(results: dict) -> str:
    """One line per row for the report's verdicts: the separations, and the stale states the check lets pass."""
    lines = []
    for row in (r for r in results["rows"] if "skipped" not in r):
        sep, fsep, ok = separation(row), fingerprint_separation(row), caught(row)
        passed = [c for c in STALE if c in ok and not ok[c]]
        best = max(sep, fsep or 0.0)
        lines.append(
            f"- {row['model']} {row['dtype']} {row['mode']}, {row['steps']} step(s) behind: probe separation "
            f"{_times(sep)}, fingerprint separation {_times(fsep) if fsep is not None else 'not measured'} "
            f"({'met' if best >= 3 else 'NOT met'}, target >= 3x); correct push "
            f"{'passes' if ok['correct'] else 'REFUSED'}; "
            + (f"passes the check: {', '.join(passed)}" if passed else "every stale state caught")
        )
    return "\n".join(lines)


def to_markdown(results: dict) -> str:
    """The table; the ratios are recomputed from the measured gaps with the current `gap_ratio` and tolerance."""
    from epo_trl.trainers.vllm_sync import DEFAULT_SYNC_TOLERANCE
    from epo_trl.trainers.weight_fingerprint import FINGERPRINT_TOL

    from .common import md_table

    header = ["model", "engine dtype", "mode", "steps behind", "gap after the first push (nats)", "correct push",
              *STALE, "probe separation", "fingerprint: correct", "fingerprint: smallest stale",
              "fingerprint separation", "previous check's separation"]  # fmt: skip
    table, missed = [], []
    for row in results["rows"]:
        if "skipped" in row:
            table.append([row["model"], "-", "-", "-", f"skipped: {row['skipped']}", *[""] * (len(header) - 5)])
            continue
        ratio = _ratios(row)

        def cell(case, row=row, ratio=ratio):
            if case not in ratio:
                return "n/a"
            effect = f" (Δ {row['effect'][case]:.2g})" if case != "correct" else ""
            return f"{ratio[case]:.3g}{effect}"

        fp, fsep = row.get("fingerprint") or {}, fingerprint_separation(row)
        stale_fp = [fp[c]["worst"] for c in STALE if c in fp]
        table.append([row["model"], row["dtype"], row["mode"], row["steps"], f"{row['reference_gap']:.2g}",
                      cell("correct"), *[cell(c) for c in STALE], _times(separation(row)),
                      f"{fp['correct']['worst']:.2g}" if fp else "-", f"{min(stale_fp):.2g}" if stale_fp else "-",
                      _times(fsep) if fsep is not None else "-", _times(row["old_separation"])])  # fmt: skip
        ok = caught(row)
        for case in (c for c in STALE if c in ok and not ok[c]):
            missed.append(
                f"{row['model']} {row['dtype']} {row['mode']}, {row['steps']} step(s) behind, {case}: "
                f"{ratio[case]:.3g} (correct push {ratio['correct']:.3g}): the stale engine's log-probs differ from "
                f"the correct engine's by {row['effect'][case]:.2g} nats"
            )
    notes = "\n".join(f"- {line}" for line in missed) or "- none"
    return md_table(header, table) + (
        "\n\nCells: `gap_ratio`, the probe's mean |engine - trainer| log-prob gap over the gap right after the first "
        "(full) push, floored at `GAP_FLOOR` and at `MOVE_SHARE` of the trainer's move; in brackets the stale effect, mean |stale engine - correct "
        "engine| log-prob (nats). Fingerprint: the worst layer group's relative mismatch of the weight fingerprints "
        f"(engine kernels vs trainer, `FINGERPRINT_TOL` {FINGERPRINT_TOL:g}); separation floored at float64 epsilon. "
        "The trainer is `steps behind` AdamW steps ahead of the engine's old weights at the "
        f"recipe learning rate (tiny 5e-4, SmolLM2 2e-5). Stale states the check (probe ratio above "
        f"{DEFAULT_SYNC_TOLERANCE:g} or a fingerprint mismatch above {FINGERPRINT_TOL:g}) lets pass:\n\n" + notes
    )


if __name__ == "__main__":  # python -m research.bench.sync_separation: the table alone
    print(to_markdown(run(quick="--quick" in sys.argv, smoke="--smoke" in sys.argv)))
