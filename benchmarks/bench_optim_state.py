"""Optimizer-state bytes per trainable parameter, measured from each optimizer's own tensors
(``lowmem.memory.state_bytes``) after one step, lowmem vs galore-torch / apollo-torch.

Model: a Llama-shaped block (hidden 1024, intermediate 4096, 16 heads, 4 KV heads, vocab 8192,
``--layers`` blocks) built from a config on CPU in fp32. The 1B shape (hidden 2048) is not used:
an fp32 SVD of a 8192x2048 gradient takes ~30 s on this shared 2-core machine, and neither
reference package can run on the meta device (seeded generators, SVD). Bytes per projected
weight are exact functions of the shapes (GaLore: 2*r*max(m,n)*4 + r*min(m,n)*4 bytes).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from _common import markdown_table, write_result
from lowmem import create_optimizer
from lowmem.memory import state_bytes
from lowmem.optim.targets import split_parameters

CASES = [  # label, lowmem name, hparams, reference factory name
    ("AdamW", "adamw", {}, "torch"),
    ("GaLore r=128", "galore_adamw", dict(rank=128, scale=0.25), "galore"),
    ("GaLore r=256", "galore_adamw", dict(rank=256, scale=0.25), "galore"),
    ("GaLore r=256, 8-bit moments", "galore_adamw", dict(rank=256, scale=0.25, state_bits=8), None),
    ("APOLLO r=256", "apollo", dict(rank=256), "apollo"),
    ("APOLLO-Mini", "apollo_mini", {}, "apollo"),
    ("FRUGAL rho=0.25 (blocks)", "frugal", dict(density=0.25), None),
    ("FRUGAL rho=0.25 (columns)", "frugal", dict(density=0.25, proj_type="columns"), None),
    ("SGD-SaI", "sgd_sai", {}, "sgd_sai"),
    ("SGD-SaI, 8-bit momentum", "sgd_sai", dict(state_bits=8), None),
    ("SWAN", "swan", {}, None),
    ("SinkGD", "sinkgd", {}, None),
]


def build_model(layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                               num_attention_heads=16, num_key_value_heads=4, vocab_size=8192)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def reference(kind: str, model, hparams: dict):
    if kind == "torch":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if kind == "sgd_sai":
        from sgd_sai import SGD_sai

        return SGD_sai(model.parameters(), lr=1e-3)
    split = split_parameters(model)
    keys = dict(rank=hparams.get("rank", 1), update_proj_gap=200, scale=hparams.get("scale", 1.0), proj_type="std")
    if kind == "apollo":
        from apollo_torch import APOLLOAdamW

        keys.update(proj="random", scale_type="tensor" if keys["rank"] == 1 else "channel",
                    scale=128.0 if keys["rank"] == 1 else 1.0)
        cls = APOLLOAdamW
    else:
        from galore_torch import GaLoreAdamW as cls
    groups = [{"params": [p for _, p in split.targets], **keys},
              {"params": [p for _, p in split.decay + split.no_decay]}]
    return cls(groups, lr=1e-3)


def ref_state_bytes(opt) -> int:
    """Reference packages keep the projector as a Python object: count its matrix too."""
    total = state_bytes(opt)
    for st in opt.state.values():
        proj = st.get("projector")
        mats = getattr(proj, "ortho_matrix", None)
        for m in mats if isinstance(mats, list) else [mats]:
            if isinstance(m, torch.Tensor):
                total += m.numel() * m.element_size()
    return total


def measure(model, opt, counter) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    targets = [p for _, p in split_parameters(model).targets]
    n_all = sum(p.numel() for p in model.parameters())
    n_targets = sum(p.numel() for p in targets)
    per_target = counter_for(opt, counter, targets) / n_targets
    return counter(opt) / n_all, per_target


def counter_for(opt, counter, params) -> int:
    wanted = {id(p) for p in params}
    sub = type("Sub", (), {"state": {p: s for p, s in opt.state.items() if id(p) in wanted}})()
    return counter(sub)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="labels of CASES to run (default: all)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for label, name, hparams, ref_kind in CASES:
        if args.only is not None and label not in args.only:
            continue
        model = build_model(args.layers)
        all_b, tgt_b = measure(model, create_optimizer(model, name, lr=1e-3, **hparams), state_bytes)
        ref_all = ref_tgt = "-"
        if ref_kind:
            model = build_model(args.layers)
            ra, rt = measure(model, reference(ref_kind, model, hparams), ref_state_bytes)
            ref_all, ref_tgt = f"{ra:.4f}", f"{rt:.4f}"
        rows.append([label, f"{all_b:.4f}", ref_all, f"{tgt_b:.4f}", ref_tgt])
        print(rows[-1], flush=True)
    table = markdown_table(["optimizer", "lowmem B/param (all)", "reference B/param (all)",
                            "lowmem B/param (projected weights)", "reference B/param (projected weights)"], rows)
    write_result("optim_state", f"Optimizer state bytes per trainable parameter (Llama block, hidden 1024, "
                 f"{args.layers} layer(s), fp32)", table,
                 notes="Measured after one step from the tensors each optimizer holds (lowmem: `optimizer.state`; "
                       "references: `optimizer.state` plus the projector matrix they keep in a Python object). "
                       "APOLLO's random projection is regenerated from its seed, so lowmem stores no matrix. "
                       "'all' includes embeddings, norms and lm_head (plain AdamW, 8 B/param; SGD-SaI: "
                       "its momentum buffer, 4 B/param, and one g-SNR scalar per tensor).")


if __name__ == "__main__":
    main()
