"""Mixed precision: which runs use bf16 autocast (``pretrain.precision``, ``finetune.precision``).

    auto  bf16 where the hardware computes it natively: CUDA, or a CPU with AVX512-BF16 or AMX
          (matrix products then run ~1.3-2x faster); fp32 elsewhere (emulated bf16 is slower)
    bf16  bf16 autocast on any device
    fp32  no autocast

Under autocast the matrix products run in bf16; weights, gradients, optimizer state, losses and
reductions stay fp32. Evaluation of ID models runs in fp32 (see ``TabularTask``).
"""

from __future__ import annotations

import contextlib

import torch

from flip.errors import SettingError

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: torch.device) -> bool:
    """True on CUDA and on CPUs with AVX512-BF16 or AMX tiles."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def use_bf16(precision: str, device: torch.device, key: str = "precision") -> bool:
    """Whether ``precision`` (auto | bf16 | fp32) means bf16 autocast on ``device``; ``key`` names
    the setting in the error for anything else."""
    p = (precision or "auto").lower()
    if p not in PRECISIONS:
        raise SettingError(f"{key}={precision!r} must be auto, bf16 or fp32")
    return p == "bf16" or (p == "auto" and native_bf16(device))


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast context on ``device`` (a no-op context when not ``enabled``)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
