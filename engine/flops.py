"""How much arithmetic a frame costs and how much the machine can do: the yardsticks beside the
engine's frames/s.

:func:`model_gflop` counts the network's floating-point operations for one frame (torch's
FlopCounterMode: 2 per multiply-add, convolutions and matrix products; the probability head's
softmax is left out, as it is a few per pixel). :func:`gemm_ceiling_gflops` measures this
machine's dense FP32 matrix-product rate with torch on every core it uses: the practical peak
of the CPU (on a GPU machine, of the card) that a frames/s figure is a fraction of.
"""

from __future__ import annotations

import time

import torch

from engine.model_io import LoadedModel, padded_side


def model_gflop(loaded: LoadedModel, side: int) -> float:
    """GFLOP of one (side x side) frame through the network (2 FLOP per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    side = padded_side(side, loaded.size_multiple)  # as the backends pad
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        loaded.model(torch.zeros(1, 1, side, side))
    return counter.get_total_flops() / 1e9


def gemm_ceiling_gflops(
    n: int = 2048, seconds: float = 1.0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> float:
    """Sustained GFLOP/s of (n x n) @ (n x n) products in ``dtype`` on ``device`` (best of the
    calls in about ``seconds``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
