"""The storage tiers below the device, and the one rule that places data on them.

ZO2 (Wang et al., 2025, arXiv 2503.12668) keeps the offloaded blocks in host RAM; Fuyou (Liao et
al., 2024, arXiv 2403.06504, §4) adds NVMe below it for what RAM cannot hold. Both engines place
every offloaded item -- a block's weights (:class:`~lowmem.offload.store.BlockStore`), the large
parameters outside the blocks (:mod:`lowmem.offload.fo_resident`), a block's optimizer state
(:class:`~lowmem.offload.fo_state.StateTier`) -- by the same rule:

    in the order items are placed, an item goes to the first tier of TIERS with room for it:
    host RAM while the running total of what it holds fits offload.host_memory_budget_gb
    (no budget: always), else NVMe (files under offload.nvme_dir; refused when it is not set)

A tier is an object (:class:`Tier`), not a name: each holder maps it to its own storage for that
tier (``BlockStore``: flat buffers or checksummed block files; ``StateTier``: tensors left in
``optimizer.state`` or packed state files). Adding a tier is one entry of :data:`TIERS` with its
room rule here, and its storage in ``store.py`` and ``fo_state.py``. ``tier.name`` is what reports
show (``engine.store.tiers``, ``--plan``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tier:
    """A storage level: its report ``name`` and whether its bytes are host RAM (``in_ram``: they
    count against ``offload.host_memory_budget_gb``)."""

    name: str
    in_ram: bool


HOST = Tier("host", in_ram=True)
NVME = Tier("nvme", in_ram=False)
TIERS = (HOST, NVME)  # fastest first: placement takes the first one with room


class Placement:
    """The placement rule over one budget: ``place(nbytes)`` in the order items are placed.

    ``budget_bytes``: host RAM the items may take (None: unlimited); ``nvme_dir``: where NVMe files
    go (None: no NVMe tier)."""

    def __init__(self, budget_bytes: float | None, nvme_dir: str | None):
        self.left, self.nvme_dir = budget_bytes, nvme_dir

    def has_room(self, tier: Tier, nbytes: int) -> bool:
        if tier.in_ram:
            return self.left is None or nbytes <= self.left
        return self.nvme_dir is not None

    def place(self, nbytes: int, what: str = "an offloaded block") -> Tier:
        """The tier of the next item of ``nbytes`` (its RAM is taken from the budget)."""
        for tier in TIERS:
            if self.has_room(tier, nbytes):
                if tier.in_ram and self.left is not None:
                    self.left -= nbytes
                return tier
        raise ValueError(f"offload.host_memory_budget_gb: {what} ({nbytes} bytes) does not fit in the budget "
                         f"left, and offload.nvme_dir is not set")

    def place_all(self, sizes: list[int], what: str) -> list[Tier]:
        """The tiers of items of ``sizes`` bytes, in order; one line naming the total if one has none."""
        try:
            return [self.place(n) for n in sizes]
        except ValueError:
            raise ValueError(f"offload.host_memory_budget_gb: {what} need {sum(sizes) / 2**30:.2f} GiB, more "
                             f"than the budget, and offload.nvme_dir is not set") from None


def ram_bytes(tiers: list[Tier], sizes: list[int]) -> int:
    """Bytes of the items (of ``sizes``) that sit in host RAM."""
    return sum(n for t, n in zip(tiers, sizes) if t.in_ram)
