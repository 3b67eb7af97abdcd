"""Model FLOPs utilisation and peak memory: what a training run and `bifocal bench` report.

MFU = tokens/s * flops_per_token / (peak FLOP/s of one device * devices). The FLOPs per token are
the model's (bifocal.model.flops); the peak is the vendor's dense (no sparsity) tensor-core figure
for the training dtype, looked up from the CUDA device name, or given (`--peak-tflops`,
`train.peak_tflops`) for any other device. A CPU has no such table: MFU is n/a there unless given.
"""

from __future__ import annotations

import resource
import sys

import torch

# Dense peak FLOP/s per device by training dtype (NVIDIA datasheets). fp32 means plain fp32
# matmuls (no TF32); the first matching name wins, so more specific names come first.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),    # SXM
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
]


def peak_flops(device: str, dtype: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device for `dtype` (fp32/bf16/fp16), or None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if device != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, table in PEAK_FLOPS:
        if key in name:
            return table[dtype]
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, devices: int = 1) -> float | None:
    """Achieved model FLOP/s over the peak of all `devices`, or None without a known peak."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * devices)


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> tuple[str, float]:
    """("peak_mem_mb", CUDA memory allocated at most since the last reset) on a GPU; on a CPU
    ("peak_rss_mb", the process's peak resident size, which never resets)."""
    if device == "cuda":
        return "peak_mem_mb", torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return "peak_rss_mb", rss / (2**20 if sys.platform == "darwin" else 2**10)
