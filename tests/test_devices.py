"""Run-time device choice and the host line every benchmark prints."""

from __future__ import annotations

import os

import pytest
import torch

from dcfm.devices import describe_host, pick_device


def test_auto_picks_cuda_only_where_it_exists() -> None:
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_names_the_fix() -> None:
    with pytest.raises(ValueError, match="--device cpu or auto"):
        pick_device("cuda")


def test_host_line_names_what_makes_benchmarks_comparable() -> None:
    line = describe_host()
    # The CPU kernels torch dispatches to (AVX2 vs AVX512 halved model speed between two of our hosts), the CPU
    # count and torch's version; one line, so it heads a benchmark's output.
    assert torch.backends.cpu.get_cpu_capability() in line
    assert f"{os.cpu_count()} logical CPUs" in line and torch.__version__ in line and "\n" not in line
