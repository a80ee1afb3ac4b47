"""WTA-CRS activation sampling (Liu et al. 2023): linear layers that keep only a sampled,
reweighted subset of their input rows for the weight gradient. See ``swap.apply_wta_crs``."""

from lowmem.activations.swap import WTACRSHandle, apply_wta_crs, remove_wta_crs, select_targets

__all__ = ["WTACRSHandle", "apply_wta_crs", "remove_wta_crs", "select_targets"]
