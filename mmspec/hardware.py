"""What the machine can do: one place that decides the training device and whether bfloat16 is native.

The library (``pipeline.default_draft_dtype``) and the builders of the mini models (``data_tools``) ask the same
questions; answering them here keeps one probe per question instead of a copy in every trainer.
"""

from __future__ import annotations

import platform

import torch


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 math is emulated and slow."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def training_device(requested: str | None = None) -> torch.device:
    """The device the builders train on: ``requested`` when given, else cuda when available, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast pays on ``device``: every CUDA GPU since Ampere, and CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_native_bf16()


def describe_device(device: torch.device) -> str:
    """A line naming the hardware, for build_info.json and the docs ("NVIDIA H200", or the CPU model and cores)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"
