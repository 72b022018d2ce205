"""bf16 on a CPU without bf16 instructions: the CLI trains in fp32 (with a note) and vLLM gets float32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from epo_trl import hardware
from epo_trl.cli import train as cli_train
from epo_trl.rollout.backends import vllm as vllm_backend

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "smollm2_alfworld.yaml")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_native_bf16_agrees_with_the_cpu_flags():
    # An independent source: the kernel's CPU flags (oneDNN uses bf16 kernels with AVX512-BF16 or AMX-BF16).
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert hardware.cpu_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("emulated", [True, False])
def test_cli_trains_in_fp32_where_bf16_is_emulated(monkeypatch, tmp_path, emulated):
    monkeypatch.setattr(cli_train, "cpu_without_bf16", lambda use_cpu: emulated)
    notes: list[str] = []
    _, _, args = cli_train.load_config([RECIPE, "--output_dir", str(tmp_path / "run")], notes)
    assert args.bf16 is (not emulated)  # the recipe asks for bf16
    assert (hardware.NO_BF16_NOTE in notes) is emulated


def test_colocated_engine_gets_float32_where_bf16_is_emulated(monkeypatch):
    from trl.generation import vllm_generation

    engine = vllm_generation.LLM
    monkeypatch.setattr(vllm_backend, "cpu_vllm_dtype", lambda: "float32")
    with vllm_backend.cpu_engine_defaults():
        patched = vllm_generation.LLM
        assert patched.func is engine and patched.keywords == {"dtype": "float32"}
    assert vllm_generation.LLM is engine
    monkeypatch.setattr(vllm_backend, "cpu_vllm_dtype", lambda: None)
    with vllm_backend.cpu_engine_defaults():
        assert vllm_generation.LLM is engine  # vLLM's own choice where bf16 is native (or on CUDA)
