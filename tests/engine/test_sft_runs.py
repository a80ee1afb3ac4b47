"""Issue 29 through the trainer: SFT runs (packed and padded), exact resume on the ZO2 offload path, bad input."""

import json

import pytest
import torch

from lowmem.cli import main as cli_main
from lowmem.data import pack_examples
from lowmem.recipe import load_recipe
from lowmem.trainer import train
from tests.engine.conftest import TINY_MODEL
from tests.engine.test_trainable import LORA, _changed_after_training
from tests.engine.test_trainer import _losses, whole_and_resumed
from tests.offload.helpers import engine, reference


@pytest.fixture
def sft_data(tmp_path):
    """40 records in the three formats (answers derivable from the prompt)."""
    words = ["market", "match", "film", "election", "phone"]
    lines = []
    for i in range(40):
        w = words[i % 5]
        if i % 3 == 0:
            r = {"messages": [{"role": "user", "content": f"Repeat: {w} {i}"}, {"role": "assistant", "content": f"{w} {i}"}]}
        elif i % 3 == 1:
            r = {"prompt": f"Echo {w}", "completion": w}
        else:
            r = {"instruction": "Say the word.", "input": w, "output": w}
        lines.append(json.dumps(r))
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _sft(tiny_recipe, sft_data, **sections):
    data = {"task": "sft", "path": str(sft_data), "eval_fraction": 0.2, **sections.pop("data", {})}
    train = {"seq_len": 96, "eval_batches": 2, **sections.pop("train", {})}
    return tiny_recipe(data=data, train=train, **sections)


def test_sft_with_lora_trains_only_the_adapters(tiny_recipe, sft_data, tmp_path):
    recipe = _sft(tiny_recipe, sft_data, model={**TINY_MODEL, "lora": LORA},
                  train={"steps": 2, "checkpoint_every": 0})
    changed, names = _changed_after_training(recipe)
    assert changed and changed == {n for n in names if "lora_" in n}


@pytest.mark.parametrize("packing", [True, False])
def test_sft_trains_packed_and_padded(tiny_recipe, sft_data, tmp_path, packing):
    recipe = load_recipe(_sft(tiny_recipe, sft_data, data={"packing": packing}),
                         ["train.steps=2", "train.checkpoint_every=0", f"output.dir={tmp_path / str(packing)}"])
    summary = train(recipe, progress=False)
    assert summary["steps"] == 2 and summary["data"] == {"records": 40, "truncated": 0, "dropped": 0,
                                                         "train_examples": 32}
    assert summary["eval_loss"] < summary["eval_loss_before"]
    saved = json.loads((tmp_path / str(packing) / "model" / "config.json").read_text())
    assert saved["use_cache"] is True  # off in training (packed positions need it), on again for generation


def test_sft_resume_on_the_zo2_offload_path_is_bit_exact(tiny_recipe, sft_data, tmp_path):
    """The ZO2 engine drives the blocks itself: packed position_ids must reach the mask, and a resumed run must
    continue exactly (every step's loss and the final weights)."""
    recipe = _sft(tiny_recipe, sft_data, optim={"name": "mezo", "lr": 1e-3, "args": {"eps": 1e-3}},
                  offload={"enabled": True, "host_memory_budget_gb": 0, "nvme_dir": str(tmp_path / "nvme")})
    whole, broken = whole_and_resumed(recipe, tmp_path)
    assert _losses(broken) == _losses(whole)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_zo2_engine_on_packed_rows_equals_in_memory_mezo(tiny_model, arch):
    """Offloading never changes the numbers, with packed rows too (OPT: the explicit block-diagonal mask,
    split per branch by the engine's unit driver)."""
    from lowmem.build import keep_documents_apart
    from lowmem.data import PackedBatches

    gen = torch.Generator().manual_seed(0)
    docs = [(x, [-100] + x[1:]) for x in (torch.randint(0, 128, (n,), generator=gen).tolist() for n in (5, 7, 4, 9, 6, 3))]
    rows = PackedBatches(pack_examples(docs, 12, 0, "data.path"), 2, seed=0)
    ref, ref_opt = reference(tiny_model, arch=arch, layers=3)
    _, eng = engine(tiny_model, arch=arch, layers=3)
    keep_documents_apart(ref, rows, [])
    assert rows.block_mask == (arch == "opt")
    for k in range(3):
        batch = rows.batch(k)
        # no KV cache: with one, transformers builds a plain causal mask and ignores the packing (the trainer's
        # objectives all pass use_cache=False)
        expected = ref_opt.step(lambda: ref(**batch, use_cache=False).loss)
        assert torch.equal(expected, eng.step(batch)), f"step {k}"


def test_bad_record_stops_the_cli_before_training(tiny_recipe, sft_data, tmp_path, capsys):
    lines = sft_data.read_text().splitlines()
    lines[6] = json.dumps({"prompt": "p", "completion": ""})
    sft_data.write_text("\n".join(lines) + "\n")
    run = tmp_path / "bad-run"
    assert cli_main([_sft(tiny_recipe, sft_data), f"output.dir={run}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lowmem-train: error: {sft_data}: record 7: empty completion"]
    assert not run.exists()  # nothing trained, nothing written
