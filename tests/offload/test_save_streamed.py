"""The final model written block by block from the offload tiers (lowmem.model_save.save_streamed) is what
transformers' save_pretrained writes of the same trained model -- same names, dtypes and values, tied
weights once -- and AutoModelForCausalLM.from_pretrained loads it."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lowmem import checkpoint as ckpt
from lowmem.model_save import save_atomically, save_streamed, saved_tensors
from lowmem.models import save_pretrained
from tests.offload import fo_helpers
from tests.offload import helpers as zo2_helpers
from tests.offload.helpers import batches


def _trained(tiny_model, engine: str, arch: str, tied: bool, nvme, dtype):
    config = {"nvme_dir": str(nvme), "host_memory_budget_gb": 0.0} if nvme else {}
    if engine == "first_order":
        model, eng = fo_helpers.engine(tiny_model, "adamw", config, arch=arch, tied=tied, layers=3, dtype=dtype)
        for b in batches(2):
            fo_helpers.eng_step(eng, b)
    else:
        model, eng = zo2_helpers.engine(tiny_model, config, arch=arch, tied=tied, layers=3, dtype=dtype)
        for b in batches(2):
            eng.step(b)  # leaves a deferred update, which the save must apply
    return model, eng


@pytest.mark.parametrize("engine,arch,tied,on_nvme,dtype", [
    ("first_order", "llama", True, True, torch.float32),
    ("first_order", "opt", False, False, torch.bfloat16),
    ("zo2", "llama", False, True, torch.bfloat16),
    ("zo2", "gpt2", True, False, torch.float32),
])
def test_streamed_save_equals_save_pretrained(tiny_model, char_tokenizer, tmp_path, engine, arch, tied, on_nvme,
                                               dtype):
    model, eng = _trained(tiny_model, engine, arch, tied, tmp_path / "nvme" if on_nvme else None, dtype)
    save_atomically(tmp_path / "streamed", lambda d: save_streamed(model, char_tokenizer, d, eng.export_parts()))
    eng.close()  # today's path: every block back into the model, then save_pretrained
    save_atomically(tmp_path / "memory", lambda d: save_pretrained(model, char_tokenizer, d))

    streamed, memory = saved_tensors(tmp_path / "streamed"), saved_tensors(tmp_path / "memory")
    assert streamed.keys() == memory.keys()
    assert {n: t.dtype for n, t in streamed.items()} == {n: t.dtype for n, t in memory.items()}
    assert not [n for n in memory if not torch.equal(streamed[n], memory[n])]
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4  # a shard per block (3) and the modules outside
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "streamed" / name).read_text() == (tmp_path / "memory" / name).read_text()
    assert not list(tmp_path.glob(".tmp-*"))

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert loaded.dtype == dtype
    assert all(torch.equal(t, loaded.state_dict()[n]) for n, t in model.state_dict().items())


def test_atomic_save_keeps_the_previous_model(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("old")

    def dies(directory):
        (directory / "config.json").write_text("new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_atomically(tmp_path / "model", dies)
    assert (tmp_path / "model" / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# every block and its state on NVMe / in host RAM; the embeddings' masters and state placed as the blocks'
@pytest.mark.parametrize("budget,embeddings", [(0.0, "off"), (None, "off"), (0.0, "on")])
def test_streamed_checkpoint_equals_the_in_memory_one_and_resumes_exactly(tiny_model, tmp_path, budget, embeddings):
    config = {"nvme_dir": str(tmp_path / "nvme"), "host_memory_budget_gb": budget, "offload_embeddings": embeddings}
    model, eng = fo_helpers.engine(tiny_model, "adamw8bit", config, layers=3)
    for b in batches(2):
        fo_helpers.eng_step(eng, b)
    names = {n for n, _ in model.named_parameters()}
    with eng.full_state():  # the old path: every weight and every block's state in memory at once
        ckpt.save_checkpoint(tmp_path / "old", eng.steps, optimizer=eng.optimizer,
                             weights={n: t for n, t in eng.model_state_dict().items() if n in names})
    with eng.checkpoint_state.placeholders():
        new = ckpt.save_checkpoint(tmp_path / "new", eng.steps, optimizer=eng.optimizer,
                                   weights=eng.checkpoint_parts(names), optimizer_parts=eng.checkpoint_state.parts)
    old = ckpt.latest_checkpoint(tmp_path / "old")
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(old / name)), load_file(str(new / name))
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), name
    assert any(t.dtype == torch.uint8 for t in load_file(str(new / "optimizer.safetensors")).values())
    meta = [json.loads((d / "trainer.json").read_text())["optimizer"] for d in (old, new)]
    assert meta[0] == meta[1]

    model2, eng2 = fo_helpers.engine(tiny_model, "adamw8bit", {**config, "nvme_dir": str(tmp_path / "nvme2")},
                                     layers=3, seed=1)
    with eng2.loading_state():
        ckpt.load_checkpoint(new, optimizer=eng2.optimizer, load_weights=eng2.load_model_state_dict,
                             load_optimizer=eng2.checkpoint_state.load)
    eng2.steps = eng.steps
    for b in batches(4)[2:]:
        assert torch.equal(fo_helpers.eng_step(eng, b), fo_helpers.eng_step(eng2, b))
    a, b = eng.model_state_dict(), eng2.model_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
