"""Streamed construction (issue 25, lowmem.block_source): a config-built model whose decoder blocks get their
values one at a time as the offload engine stores them equals the in-memory build bit for bit -- weights,
buffers and the global generator afterwards -- and trains identically through both engines, on both tiers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowmem.block_source import block_filler, build_streamed
from lowmem.models import load_model
from lowmem.offload.engine import ZO2Engine
from lowmem.offload.firstorder import FirstOrderEngine
from lowmem.optim import create_optimizer
from lowmem.recipe import ModelSection
from lowmem.structure import block_container
from tests.offload.helpers import HP, assert_same_weights, batches

ROOT = Path(__file__).resolve().parents[2]
ARCHS = [("llama", False), ("llama", True), ("opt", True)]


def in_memory(config, seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype)


@pytest.mark.parametrize("arch,tied", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streamed_build_equals_in_memory(tiny_config, arch, tied, dtype):
    ref = in_memory(tiny_config(arch, tied, layers=3), 11, dtype)
    after_ref = torch.get_rng_state()
    model = build_streamed(tiny_config(arch, tied, layers=3), 11, dtype)
    assert torch.equal(torch.get_rng_state(), after_ref)  # what the run draws next is unchanged
    blocks = block_container(model)[1]
    assert all(p.is_meta for p in blocks.parameters())
    assert not any(p.is_meta for n, p in model.named_parameters() if ".layers." not in n)
    for block in blocks:
        block_filler(model).fill(block)
    assert_same_weights(model.state_dict(), ref)
    assert all(torch.equal(b, dict(ref.named_buffers())[n]) for n, b in model.named_buffers())
    if tied:
        assert model.lm_head.weight is model.get_input_embeddings().weight


ENGINES = {"zo2": lambda m, cfg: ZO2Engine(m, create_optimizer(m, "mezo", **HP), cfg, device="cpu"),
           "first_order": lambda m, cfg: FirstOrderEngine(m, create_optimizer(m, "adamw", lr=1e-2), cfg, device="cpu")}
TIERS = {"host": lambda tmp: {}, "nvme": lambda tmp: dict(nvme_dir=str(tmp), host_memory_budget_gb=0.0)}


@pytest.mark.parametrize("name", list(ENGINES))
@pytest.mark.parametrize("tier", list(TIERS))
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_engine_on_streamed_build_equals_in_memory_build(tiny_config, tmp_path, name, tier, arch):
    runs = []
    for streamed in (False, True):
        config = tiny_config(arch, layers=3)
        model = build_streamed(config, 3, torch.float32) if streamed else in_memory(config, 3, torch.float32)
        eng = ENGINES[name](model.train(), TIERS[tier](tmp_path / str(streamed)))
        assert eng.store.tiers == [tier] * 3
        before = eng.model_state_dict()
        losses = [eng.step(b) if name == "zo2" else eng.step(lambda b=b: eng.model(**b).loss)[0]
                  for b in batches(2)]
        eng.flush()
        runs.append((before, losses, eng.model_state_dict()))
    (before, losses, after), (s_before, s_losses, s_after) = runs
    assert_same_weights(s_before, before)
    assert all(torch.equal(a, b) for a, b in zip(losses, s_losses))
    assert_same_weights(s_after, after)


@pytest.mark.parametrize("arch,tied", ARCHS[1:])
@pytest.mark.parametrize("shards,tier", [("single", "host"), ("sharded", "nvme")])
def test_streamed_load_equals_from_pretrained(tiny_model, tmp_path, arch, tied, shards, tier):
    """A saved checkpoint read tensor by tensor into the engine's tiers equals ``from_pretrained`` (bf16 run
    from an fp32 file: each tensor cast as it is read)."""
    saved = tmp_path / "saved"
    shard = {"max_shard_size": "20KB"} if shards == "sharded" else {}
    tiny_model(arch, tied, layers=3, seed=4).save_pretrained(saved, **shard)
    assert (saved / "model.safetensors.index.json").is_file() == (shards == "sharded")
    ref = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    model = load_model(ModelSection(path=str(saved), dtype="bfloat16", tokenizer="bytes"), streamed=True)
    assert all(p.is_meta for p in block_container(model)[1].parameters())
    eng = ENGINES["zo2"](model, TIERS[tier](tmp_path / "tier"))
    assert_same_weights(eng.model_state_dict(), ref)


def _peaks(directory, *modes: str) -> dict:
    """:mod:`tests.offload.rss_worker` in a fresh process. ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB: glibc
    otherwise raises its mmap threshold up to 32 MiB as large chunks are freed, and keeps the freed blocks of
    this small model (tensors of a few MiB) in its heap, which the peak would count; a real model's tensors
    are larger than 32 MiB and always mapped. Both the streamed and the in-memory build run under it."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "offload" / "rss_worker.py"), str(directory), *modes],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak RSS reset")
def test_host_peak_of_streamed_build_and_load_stays_near_one_block(tmp_path):
    """8 blocks of 6.6 MiB (fp32) into ZO2's NVMe tier: the peak RSS above the start of the build stays
    within the units, two blocks (one filled, its packed copy) and 12 MiB; the in-memory build exceeds it."""
    runs = _peaks(tmp_path, "streamed", "load_streamed", "in_memory")
    sizes = runs["streamed"]
    budget = sizes["units"] + 2 * sizes["block"] + 12 * 2**20
    assert runs["streamed"]["peak"] <= budget, runs
    assert runs["load_streamed"]["peak"] <= budget, runs
    assert runs["in_memory"]["peak"] > budget + 2 * sizes["block"], runs


def write_tiny_gguf(path: Path, layers: int = 2, hidden: int = 64, inter: int = 128, heads: int = 4, kv: int = 2,
                    vocab: int = 96) -> None:
    """A Llama GGUF file of random tensors: the block Linear weights in Q8_0, the rest in F16."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(w.add_context_length, 128), (w.add_embedding_length, hidden), (w.add_block_count, layers),
                       (w.add_feed_forward_length, inter), (w.add_head_count, heads), (w.add_head_count_kv, kv),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 1e4), (w.add_vocab_size, vocab)]:
        add(value)

    def tensor(name: str, shape: tuple, quantized: bool) -> None:
        a = rng.standard_normal(shape).astype(np.float32)
        q8 = gguf.GGMLQuantizationType.Q8_0
        if quantized:
            w.add_tensor(name, gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, a.astype(np.float16))

    tensor("token_embd.weight", (vocab, hidden), False)
    for i in range(layers):
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (hidden // heads * kv, hidden)),
                            ("attn_v", (hidden // heads * kv, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))]:
            tensor(f"blk.{i}.{name}.weight", shape, True)
        tensor(f"blk.{i}.attn_norm.weight", (hidden,), False)
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,), False)
    tensor("output_norm.weight", (hidden,), False)
    tensor("output.weight", (vocab, hidden), True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_streamed_gguf_load_equals_the_in_memory_load(tmp_path):
    """A GGUF file de-quantized tensor by tensor into the blocks as the engine stores them equals lowmem's
    in-memory GGUF load (transformers' whole-file loader, then a plain copy), bf16."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    section = ModelSection(path=str(tmp_path), gguf_file="tiny.gguf", tokenizer="bytes", dtype="bfloat16")
    ref = load_model(section)
    model = load_model(section, streamed=True)
    assert model.config.to_dict() == ref.config.to_dict()  # the config from the metadata parsed once
    assert all(p.is_meta for p in block_container(model)[1].parameters())
    eng = ENGINES["zo2"](model, TIERS["nvme"](tmp_path / "tier"))
    assert_same_weights(eng.model_state_dict(), ref)


@pytest.mark.parametrize("arch,tied", ARCHS)
def test_a_bf16_config_model_is_built_in_memory_without_an_fp32_copy_yet_equal(tiny_config, arch, tied,
                                                                                  monkeypatch):
    """load_model's in-memory build of a config in bf16 fills block after block (build_in_memory): the same
    weights, buffers and generator afterwards as from_config in fp32 then .to(bf16)."""
    import lowmem.block_source as block_source

    streamed = []
    monkeypatch.setattr(block_source, "build_streamed",
                        lambda *a: streamed.append(a) or build_streamed(*a))  # the block-by-block path is taken
    config = tiny_config(arch, tied, layers=3)
    ref = in_memory(config, 5, torch.bfloat16)
    after_ref = torch.get_rng_state()
    section = ModelSection(config={"model_type": config.model_type, **config.to_diff_dict()}, tokenizer="bytes",
                           dtype="bfloat16", seed=5)
    model = load_model(section)
    assert len(streamed) == 1 and torch.equal(torch.get_rng_state(), after_ref)
    assert block_filler(model) is None and not any(p.is_meta for p in model.parameters())
    assert_same_weights(model.state_dict(), ref)
    assert all(torch.equal(b, dict(ref.named_buffers())[n]) for n, b in model.named_buffers())
    if tied:
        assert model.lm_head.weight is model.get_input_embeddings().weight
