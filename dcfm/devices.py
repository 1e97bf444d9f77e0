"""Run-time device choice: CUDA when present, else CPU; nothing is decided at import time."""

from __future__ import annotations

import os
import platform

import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; an explicit name is validated."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu or auto")
    return device


def describe_host() -> str:
    """One line naming what a benchmark ran on: CPU model, logical CPUs, the CPU kernels torch dispatches to
    (e.g. AVX2, AVX512), torch's version and the GPUs if any. Benchmark numbers are only comparable between
    runs on the same kind of host: this project's 2-core machines have differed by ~2x in model speed."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:  # Linux: platform.processor() only gives the architecture there
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    parts = [f"{model or platform.machine()}", f"{os.cpu_count()} logical CPUs",
             f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.append(", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    return "; ".join(parts)
