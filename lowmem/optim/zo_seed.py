"""The seeds of the zeroth-order perturbations: one 63-bit seed per parameter and sample,

    seed(p) = mix(step_seed, stream, index(p)),

so that ``z`` can be regenerated for any parameter alone, in any order, on any device copy (MeZO,
Malladi et al., 2023, Algorithm 1, stores the step's seed instead of ``z``; here the seed is
per parameter, not one reseeding of the global RNG). ``mix`` folds each part into one SplitMix64
step (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014; the
golden-gamma increment and the finaliser constants of Java's ``SplittableRandom``): order-sensitive
and well mixed, so nearby step seeds, streams and indices give unrelated generator seeds.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """Hash integers into one 63-bit seed (order-sensitive, well mixed)."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h & ((1 << 63) - 1)


def param_seed(step_seed: int, stream: int, index: int) -> int:
    return mix_seed(step_seed, stream, index)
