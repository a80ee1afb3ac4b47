"""Activation memory: WTA-CRS sampling of linear layers (Liu et al. 2023; ``swap.apply_wta_crs``),
and lean RMSNorm / gated-MLP modules that recompute their element-wise ops (``lean.apply_lean``)."""

from __future__ import annotations

import torch
from torch import nn

from lowmem.activations.lean import LeanHandle, apply_lean, remove_lean
from lowmem.activations.swap import WTACRSHandle, apply_wta_crs, remove_wta_crs, select_targets

__all__ = ["LeanHandle", "WTACRSHandle", "apply_activations", "apply_lean", "apply_wta_crs", "remove_lean",
           "remove_wta_crs", "select_targets"]


def apply_activations(model: nn.Module, section, seed: int) -> torch.Generator | None:
    """Apply a recipe's ``activations`` section to ``model``; returns WTA-CRS's sampling generator
    (seeded with ``seed``), which a checkpoint must carry, or None without WTA-CRS."""
    generator = None
    if section.wta_crs is not None:
        wta = section.wta_crs
        generator = apply_wta_crs(model, wta.keep_ratio, targets=wta.targets, seed=seed).generator
    if section.lean:
        apply_lean(model)
    return generator
