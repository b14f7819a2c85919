"""Where the PyTorch models run: CPU (default) or a CUDA GPU, with the GPU's fast settings.

On CUDA the networks run in channels_last memory order under bfloat16 autocast (what tensor cores
are fast at; outputs are returned as float32 on the CPU); on the CPU nothing changes, so the CPU
path stays bit-for-bit the one the tests check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; a clear error when CUDA is asked for and absent."""
    device = torch.device(name or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to PyTorch here (is this a CPU-only "
                         "PyTorch build?); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: choose cpu or cuda[:N]")
    return device


def place(net: M, device: torch.device) -> M:
    """Move a network to ``device`` (channels_last on CUDA)."""
    net = net.to(device)
    # Module.to takes memory_format; torch's stubs list only its device/dtype/tensor forms
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net  # type: ignore[call-overload]


def run(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``net(x)`` on ``device`` (a network or one of its methods); float32 on the CPU back."""
    if device.type == "cpu":
        return net(x)
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return net(x).float().cpu()
