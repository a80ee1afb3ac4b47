"""The parameter-target rule: which weights get the memory-saving method.

By default the 2-D weights of ``nn.Linear`` layers *inside the transformer
blocks* (the modules under the model's block ``ModuleList``) are targets;
embeddings, norms, biases and ``lm_head`` are not (the split of the GaLore
reference's ``torchrun_main.py``: Linear modules of attention and MLP; Zhao et
al. 2024, arXiv 2403.03507). A recipe may
replace the rule with glob patterns on module names (``optim.target_modules``).

The rule returns three disjoint, ordered lists so the optimizer can build
param groups: ``targets`` (memory-saving method), ``decay`` (other >=2-D
weights: AdamW with weight decay), ``no_decay`` (biases and norm weights).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from lowmem.structure import block_container


@dataclass
class ParamSplit:
    targets: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    decay: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    no_decay: list[tuple[str, nn.Parameter]] = field(default_factory=list)


def _default_target_modules(model: nn.Module) -> set[str]:
    found = block_container(model)
    if found is None:
        return set()
    prefix, blocks = found
    names = set()
    for i, block in enumerate(blocks):
        for sub, module in block.named_modules():
            if isinstance(module, nn.Linear):
                names.add(f"{prefix}.{i}.{sub}" if prefix else f"{i}.{sub}")
    return names


def _pattern_target_modules(model: nn.Module, patterns: list[str]) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            names.add(name)
    if not names:
        raise ValueError(f"optim.target_modules: no nn.Linear module matches {patterns}")
    return names


def split_parameters(model: nn.Module, target_modules: list[str] | None = None) -> ParamSplit:
    """Split the trainable parameters of ``model`` by the target rule.

    Shared (tied) parameters appear once, under their first name.
    """
    if target_modules:
        target_names = _pattern_target_modules(model, target_modules)
    else:
        target_names = _default_target_modules(model)
    target_params = set()
    for name, module in model.named_modules():
        if name in target_names:
            target_params.add(id(module.weight))
    split = ParamSplit()
    for name, p in model.named_parameters():  # deduplicates tied weights
        if not p.requires_grad:
            continue
        if id(p) in target_params and p.dim() == 2:
            split.targets.append((name, p))
        elif p.dim() >= 2:
            split.decay.append((name, p))
        else:
            split.no_decay.append((name, p))
    return split

