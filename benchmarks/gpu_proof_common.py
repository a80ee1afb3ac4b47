"""Shared pieces of :mod:`gpu_proof` (issue #18): the sizes of a run (:class:`Shapes`: ``Shapes.gpu()``
the real ones, ``Shapes.dry()`` tiny ones for the CPU), timing and bandwidth helpers, and models, batches
and recipes built from configs with cheap initialisation (on the device, or from one random pool on the
host for the offloaded model), never downloaded.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                 tie_word_embeddings=False, rope_theta=500000.0)
OPT_30B = dict(model_type="opt", hidden_size=7168, ffn_dim=28672, num_hidden_layers=48, num_attention_heads=56,
               word_embed_proj_dim=7168, vocab_size=50272, max_position_embeddings=2048)
OPT_1_3B = dict(model_type="opt", hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                word_embed_proj_dim=2048, vocab_size=50272, max_position_embeddings=2048)
TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
TINY_OPT = dict(model_type="opt", hidden_size=64, ffn_dim=160, num_hidden_layers=4, num_attention_heads=4,
                word_embed_proj_dim=64, vocab_size=300, max_position_embeddings=256)


@dataclass
class Shapes:
    device: str
    kernel_sizes: list[int]
    big: int                      # one tensor of more than 2**31 elements on a GPU
    adam_shapes: list[tuple[int, int]]
    llama: dict
    llama_tokens: tuple[int, int]
    zo2_big: dict
    zo2_big_tokens: tuple[int, int]
    zo2_fit: dict
    zo2_fit_tokens: tuple[int, int]
    repeats: int = 5
    zo2_repeats: int = 2
    fuyou_layers: int = 2         # blocks of the Llama shape through the first-order offload engine
    copy_bytes: int = 1 << 30
    notes: dict = field(default_factory=dict)

    @classmethod
    def gpu(cls) -> "Shapes":
        return cls("cuda", [1, 257, 4097, 1823 * 781], 2**31 + 4099, [(14336, 4096)] * 17, LLAMA3_8B, (1, 1024),
                   OPT_30B, (1, 512), OPT_1_3B, (4, 512))

    @classmethod
    def dry(cls) -> "Shapes":
        return cls("cpu", [1, 4097], 3 * 2**12 + 5, [(257, 129)] * 2, TINY_LLAMA, (1, 32),
                   TINY_OPT, (1, 16), TINY_OPT, (2, 16), repeats=1, zo2_repeats=1, copy_bytes=1 << 22)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up, each call synchronised."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: str, held: int = 0) -> int:
    """Reset the device's peak-memory counter; return the base a step's peak is measured from: the bytes
    allocated now (left by earlier steps) less ``held`` (what the step's own objects hold already); 0 on
    the CPU."""
    if device != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() - held


def peak_since(base: int, device: str) -> int | None:
    """Peak bytes allocated on the device above ``base`` since :func:`reset_peak` (None on the CPU)."""
    return torch.cuda.max_memory_allocated() - base if device == "cuda" else None


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy, counting read and write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_time(lambda: dst.copy_(src), device, 10)


def h2d_bandwidth(device: str, nbytes: int) -> float:
    """Bytes per second from page-locked host memory to the device (a memcpy on the CPU)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / median_time(lambda: dev.copy_(host, non_blocking=True), device, 5)


def _recipe(config: dict, tokens: tuple[int, int], dtype: str, optim: dict, model_extra: dict):
    from lowmem.recipe import recipe_from_dict

    tree = {"model": {"config": dict(config), "tokenizer": "bytes", "dtype": dtype, **model_extra},
            "data": {"path": "unused"}, "optim": optim,
            "train": {"steps": 1, "batch_size": tokens[0], "seq_len": tokens[1]},
            "output": {"dir": tempfile.gettempdir(), "save_model": False}}
    return recipe_from_dict(tree, "gpu_proof")


def host_model(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """A causal LM on the host with cheap initialisation: built on the meta device, materialised
    uninitialised on the CPU, every parameter filled from one random pool (no per-tensor init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.to_empty(device="cpu")
    params = list({id(p): p for p in model.parameters()}.values())
    pool = (torch.randn(max(p.numel() for p in params), generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    with torch.no_grad():
        for p in params:
            p.copy_(pool[:p.numel()].view_as(p))
    model.tie_weights()
    return model


class Traffic:
    """Bytes a ZO2 engine's block store hands to the device (fetches, ``up``) and takes back (writes,
    ``down``), in its host encoding (``offload.host_dtype``), counted as the engine calls the store."""

    def __init__(self, engine):
        self.up = self.down = 0
        store, fetch, commit = engine.store, engine.store.fetch, engine.store.commit

        def counted_fetch(i):
            self.up += store.numels[i] * store.dtype.itemsize
            return fetch(i)

        def counted_commit(i, target, copied, version):
            self.down += store.numels[i] * store.dtype.itemsize
            return commit(i, target, copied, version)

        store.fetch, store.commit = counted_fetch, counted_commit


def _batch(config: dict, tokens: tuple[int, int], device: str = "cpu") -> dict:
    ids = torch.randint(0, config["vocab_size"], tokens, generator=torch.Generator().manual_seed(1)).to(device)
    return {"input_ids": ids, "labels": ids}

