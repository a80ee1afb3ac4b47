"""Peak host RSS of building/loading a model into the ZO2 engine's NVMe tier, in one fresh process (run by
tests/offload/test_streamed_build.py and benchmarks/bench_streamed_build.py): ``python rss_worker.py DIR
MODE... [--config JSON]`` (a model config in place of :data:`CONFIG`) prints JSON, for each MODE
``{"peak": bytes above the RSS before the build, "block": bytes of one block, "units": bytes outside them}``.
MODE: ``streamed`` / ``in_memory`` (config build), ``load_streamed`` / ``load_in_memory`` (a checkpoint of
the same model saved under DIR/saved first, which also imports the model's code). The peak is the kernel's
high-water mark (VmHWM), reset just before each build."""

import gc
import json
import re
import sys
from pathlib import Path

import torch

from lowmem.models import load_model
from lowmem.offload.engine import ZO2Engine
from lowmem.optim import create_optimizer
from lowmem.recipe import ModelSection
from lowmem.structure import block_container

CONFIG = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 2048, "num_hidden_layers": 8,
          "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64}


def status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure(mode: str, directory: Path, config: dict) -> dict:
    """Peak RSS above the start of ``mode``'s build, up to its engine holding every block on NVMe."""
    saved = directory / "saved"
    section = (ModelSection(path=str(saved), tokenizer="bytes") if mode.startswith("load")
               else ModelSection(config=config, tokenizer="bytes"))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    model = load_model(section, streamed=mode.endswith("streamed"))
    engine = ZO2Engine(model, create_optimizer(model, "mezo", lr=1e-3, eps=1e-3),
                       {"nvme_dir": str(directory / mode), "host_memory_budget_gb": 0.0}, device="cpu")
    peak = status("VmHWM") - before
    assert engine.store.tiers == ["nvme"] * len(engine.packed)
    units = sum(p.numel() * p.element_size() for p in model.parameters())  # the blocks are unbound: size 0
    return {"peak": peak, "block": engine.packed[0].numel * 4, "units": units}  # a block in fp32


def main(directory: Path, modes: list[str], config: dict) -> None:
    load_model(ModelSection(config=config, tokenizer="bytes")).save_pretrained(directory / "saved",
                                                                               max_shard_size="10MB")
    print(json.dumps({mode: measure(mode, directory, config) for mode in modes}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[2:]
    config = json.loads(args.pop(args.index("--config") + 1)) if "--config" in args else CONFIG
    main(Path(sys.argv[1]), [a for a in args if a != "--config"], config)
