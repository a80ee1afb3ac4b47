"""The final model written block by block from the offload tiers (lowmem.model_save.save_streamed) is what
transformers' save_pretrained writes of the same trained model -- same names, dtypes and values, tied
weights once -- and AutoModelForCausalLM.from_pretrained loads it."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

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
