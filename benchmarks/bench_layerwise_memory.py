"""Peak RSS of training steps with and without layer-wise updates, one fresh subprocess per
configuration (``lowmem.memory.peak_rss_bytes``, the kernel's ru_maxrss).

Model: Llama-shaped (hidden 1024, intermediate 4096, 4 layers, vocab 8192, ~67M params, fp32),
batch 1 x 64 tokens (activations are small next to gradients), 2 optimizer steps.
GaLore is left out only for time: its first step runs an SVD per weight (~minutes here).
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

from _common import markdown_table, run_json, write_result

CONFIGS = [("AdamW", "adamw", {}), ("APOLLO-Mini", "apollo_mini", {}),
           ("FRUGAL rho=0.25 columns", "frugal", dict(density=0.25, proj_type="columns")),
           ("SGD-SaI", "sgd_sai", {}), ("SWAN", "swan", {}), ("SinkGD", "sinkgd", {})]


def one(name: str, hparams: dict, layerwise: bool) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem import create_optimizer
    from lowmem.memory import peak_rss_bytes
    from lowmem.steps.layerwise import LayerwiseOptimizer

    warnings.filterwarnings("ignore")
    cfg = AutoConfig.for_model("llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                               num_attention_heads=16, num_key_value_heads=4, vocab_size=8192)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    opt = create_optimizer(model, name, lr=1e-4, **hparams)
    if layerwise:
        opt = LayerwiseOptimizer(opt)
    ids = torch.randint(0, 8192, (1, 64), generator=torch.Generator().manual_seed(0))
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return {"peak": peak_rss_bytes(), "grad_bytes": grad_bytes}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "1")))
        return
    rows = []
    for label, name, hparams in CONFIGS:
        peaks = []
        for layerwise in (False, True):
            peaks.append(run_json([sys.executable, __file__, "--one", name, json.dumps(hparams), str(int(layerwise))]))
        saved = peaks[0]["peak"] - peaks[1]["peak"]
        rows.append([label, f"{peaks[0]['peak'] / 2**20:.0f}", f"{peaks[1]['peak'] / 2**20:.0f}",
                     f"{saved / 2**20:.0f}", f"{peaks[0]['grad_bytes'] / 2**20:.0f}"])
        print(rows[-1], flush=True)
    table = markdown_table(["optimizer", "peak RSS normal (MiB)", "peak RSS layer-wise (MiB)", "saved (MiB)",
                            "all gradients (MiB)"], rows)
    write_result("layerwise_memory", "Peak RSS of a training step, normal vs layer-wise (CPU, fp32, ~67M params)",
                 table, notes="Each cell is a fresh process; peak RSS includes the Python/torch runtime (~300 MiB).")


if __name__ == "__main__":
    main()
