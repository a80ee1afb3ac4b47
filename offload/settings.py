"""The ``offload:`` settings of both engines (embedded by the recipe as its ``offload`` section).

The engines take an :class:`OffloadSection`, a dict validated as one (errors name the field as a
recipe's would), or None for the defaults (:func:`offload_section`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator

from lowmem.dtypes import HostDtypeName
from lowmem.settings import Section, one_line


class OffloadSection(Section):
    enabled: bool = Field(False, description="Stream the decoder blocks from host RAM/NVMe: ZO2 with optim.name mezo, "
                                             "else first-order (Fuyou: fp32 masters + optimizer state off the "
                                             "device, each block stepped on the CPU inside backward)")
    host_dtype: HostDtypeName | None = Field(
        None, description="Host copy dtype of offloaded blocks; default: the training dtype. ZO2 also takes a "
                          "coarser 16-bit type or int8 (blockwise int8 + one fp32 scale per 256 weights), both "
                          "stochastically rounded")
    nvme_dir: str | None = Field(None, description="Directory for blocks (first-order: and their optimizer states) "
                                                   "beyond the host budget (checksummed files)")
    host_memory_budget_gb: float | None = Field(None, ge=0, description="Host RAM for blocks (first-order: fp32 master "
                                                                         "weights first, then optimizer states); the "
                                                                         "rest go to nvme_dir")
    prefetch_depth: int = Field(1, ge=1, description="Blocks uploaded ahead of the one computing")
    swap_activations: Literal["auto", "on", "off"] = Field(
        "auto", description="First-order: block-boundary activations to host memory; auto: decided after the first "
                            "step from measured copy bandwidths, block compute time and train.device_memory_gb")
    offload_embeddings: Literal["auto", "on", "off"] = Field(
        "auto", description="First-order: embeddings/lm_head masters and state follow the blocks' placement; auto: "
                            "those larger than one block")

    @field_validator("swap_activations", "offload_embeddings", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value  # YAML 1.1 on/off


def offload_section(config: OffloadSection | dict | None) -> OffloadSection:
    """The recipe's ``offload:`` section (a dict is validated as one; None: the defaults)."""
    if config is None or isinstance(config, OffloadSection):
        return config or OffloadSection()
    try:
        return OffloadSection(**config)
    except ValidationError as err:  # one line naming the field, as a recipe's error
        raise ValueError(f"offload.{one_line(err)}") from None
