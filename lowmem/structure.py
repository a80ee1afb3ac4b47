"""Where a model keeps its parts: the decoder blocks of a Hugging Face causal LM.

Used by the parameter-target rule (:mod:`lowmem.optim.targets`), the WTA-CRS module swap
(:mod:`lowmem.activations.swap`), the offload engines (:mod:`lowmem.offload.streamed`) and the
planner; model structure, not any one of them.
"""

from __future__ import annotations

from torch import nn


def block_container(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The largest ``nn.ModuleList`` in ``model``: the decoder blocks of any
    Hugging Face causal LM (``model.layers``, ``transformer.h``, ``decoder.layers``)."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best
