"""Dynamic quantization maps of 8-bit optimizers (Dettmers et al., 2021, "8-bit
Optimizers via Block-wise Quantization", §2.2; Dettmers 2015 for the data type).

The dynamic data type spends its bits on an exponent (the decade) and a linear
fraction. With 7 exponent bits, decade ``i = 0..6`` holds the midpoints of
``K_i`` equally spaced points in ``[0.1, 1]``, scaled by ``10^(i-6)``:

* signed map (first moment):    ``K_i = 2^i + 1``      -> 127 positive values, their negatives, 0 and 1;
* unsigned map (second moment): ``K_i = 2^(i+1) + 1``  -> 254 positive values, 0 and 1.

Both hold 256 sorted float32 values in ``[-1, 1]``; they equal
``bitsandbytes.functional.create_dynamic_map`` bit for bit because every step is
done in the same precision: linspace and midpoints in float32, the scaling by
``10^(i-6)`` as a Python float times a float32 tensor, the final sort in float64
(Python floats) before the cast to float32.
"""

from __future__ import annotations

import functools

import torch

MAX_EXPONENT_BITS = 7
TOTAL_BITS = 8


def _build_map(signed: bool) -> torch.Tensor:
    values: list[float] = []
    for i in range(MAX_EXPONENT_BITS):
        points = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        boundaries = torch.linspace(0.1, 1, points, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (i - (MAX_EXPONENT_BITS - 1))
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    values += [0.0, 1.0]
    if len(values) != 2 ** TOTAL_BITS:  # a change of the constants above must keep 256 codes
        raise ValueError(f"dynamic map: built {len(values)} values, expected {2 ** TOTAL_BITS}")
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _cached(signed: bool, device: str) -> torch.Tensor:
    return _build_map(signed).to(device)


def dynamic_map(signed: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-value dynamic map (float32, sorted), cached per device: treat it as read-only."""
    return _cached(bool(signed), str(torch.device(device or "cpu")))
