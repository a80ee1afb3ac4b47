"""ZO2 offloading (shipped as ``lowmem.offload``): MeZO with the decoder blocks kept in host RAM or on NVMe.

Entry points: :class:`ZO2Engine` and :class:`OffloadConfig` (:mod:`lowmem.offload.engine`).
"""

from lowmem.offload.engine import OffloadConfig, ZO2Engine

__all__ = ["OffloadConfig", "ZO2Engine"]
