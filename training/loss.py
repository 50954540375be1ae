"""Weighted cross-entropy of eq. 6 on the smoothed depth labels, plus a species term."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segdepth_loss(
    depth_logits: torch.Tensor,
    species_logits: torch.Tensor,
    labels: torch.Tensor,
    species: torch.Tensor,
    weights: torch.Tensor,
    species_weight: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """−Σ w·log F(y)[s] / Σ w (eq. 6, normalised by the total weight) + ``species_weight`` × the
    same weighted cross-entropy of the species head. Returns (loss, {"depth", "species"})."""
    total = weights.sum().clamp(min=1e-12)
    depth_term = (F.cross_entropy(depth_logits, labels, reduction="none") * weights).sum() / total
    species_term = (
        F.cross_entropy(species_logits, species, reduction="none") * weights
    ).sum() / total
    loss = depth_term + species_weight * species_term
    return loss, {"depth": float(depth_term.detach()), "species": float(species_term.detach())}
