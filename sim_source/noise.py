"""Shot noise of eq. (1): x ~ Poisson(λ·c)/λ for a clean image c normalised so vacuum = 1.

``dose`` λ is the mean count of a vacuum pixel. Works on numpy arrays (with a
``numpy.random.Generator``) and torch tensors (with a ``torch.Generator``, on the tensor's
device); the training loop calls it on the fly.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def poisson_counts(clean: Any, dose: Any, generator: Any) -> Any:
    """Poisson(λ·c) counts (same type as ``clean``; float for torch, int64 for numpy). ``dose``
    is a number or, for a torch batch (B, ...), a tensor of B doses (one per image)."""
    if not bool((np.asarray(dose.cpu() if hasattr(dose, "cpu") else dose) > 0).all()):
        raise ValueError(f"dose λ must be > 0, got {dose}")
    if isinstance(clean, np.ndarray):
        if not isinstance(generator, np.random.Generator):
            raise TypeError("numpy input needs a numpy.random.Generator")
        return generator.poisson(dose * np.clip(clean, 0, None))
    import torch

    if not isinstance(clean, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(clean).__name__}")
    if isinstance(dose, torch.Tensor):
        dose = dose.to(clean.device, clean.dtype).reshape(-1, *([1] * (clean.dim() - 1)))
    return torch.poisson(dose * clean.clamp(min=0), generator=generator)


def add_poisson_noise(clean: Any, dose: Any, generator: Any) -> Any:
    """Noisy image Poisson(λ·c)/λ (float32 numpy array or tensor of ``clean``'s dtype); a
    tensor ``dose`` gives one λ per image of a batch."""
    counts = poisson_counts(clean, dose, generator)
    if isinstance(counts, np.ndarray):
        return (counts / dose).astype(np.float32)
    if not isinstance(dose, (int, float)):
        dose = dose.to(counts.device, counts.dtype).reshape(-1, *([1] * (counts.dim() - 1)))
    return counts / dose
