"""What the hardware runs fast, for choosing precision by default."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX-512 BF16, AMX, or Arm's BF16).
    Elsewhere bf16 is emulated and slower than fp32."""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16", "bf16"))
    return False


def has_fast_bf16(device_type: str) -> bool:
    """Whether bf16 runs faster than fp32 on a ``cuda`` or ``cpu`` device."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_fast_bf16()
