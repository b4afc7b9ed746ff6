"""What the hardware runs fast and how fast: for choosing precision by default, and for MFU."""

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


def device_from_name(name: str) -> torch.device:
    """``auto`` (a CUDA GPU where torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``;
    a one-line ValueError for any other name, or for a GPU that torch cannot see."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device name at all
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}, but torch sees no CUDA GPU here: use cpu or auto")
    return device


def has_fast_bf16(device_type: str) -> bool:
    """Whether bf16 runs faster than fp32 on a ``cuda`` or ``cpu`` device."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_fast_bf16()


# Dense peak FLOP/s of one chip, for chips that Lightning's table (get_available_flops) misses
# or overstates: its H200 entries are the datasheet's 2:4-sparse figures, and the SXM part,
# which names itself plainly "NVIDIA H200", matches none of them; its H100 NVL entry is the
# figure of a pair of cards. The H200 SXM computes at the H100 SXM's rates; one NVL card of
# either at half its datasheet's sparse rates. "tfloat32" is fp32 run on tensor cores, as under
# torch.set_float32_matmul_precision("high"). Matched in this order.
def _dense_peaks(bf16: float, tf32: float, fp32: float) -> dict[torch.dtype | str, float]:
    return {torch.bfloat16: bf16, torch.float16: bf16, "tfloat32": tf32, torch.float32: fp32}


_DENSE_PEAK_FLOPS = {
    "h100 nvl": _dense_peaks(bf16=835.5e12, tf32=417.5e12, fp32=60e12),
    "h200 nvl": _dense_peaks(bf16=835.5e12, tf32=417.5e12, fp32=60e12),
    "h200": _dense_peaks(bf16=989.4e12, tf32=494.7e12, fp32=66.9e12),
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak FLOP/s in ``dtype`` for MFU, or None where it is unknown (CPUs).
    fp32 counts at the tensor cores' TF32 rate where torch's matmul precision allows TF32."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for chip, peaks in _DENSE_PEAK_FLOPS.items():
            if chip in name:
                tf32 = dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest"
                return peaks.get("tfloat32" if tf32 else dtype)
    # Lightning's table, imported only here: importing Lightning takes seconds, and the scripts
    # that import this module for its other functions (generate.py) need none of it.
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, dtype)


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under a Lightning precision setting such as ``bf16-mixed``."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32
