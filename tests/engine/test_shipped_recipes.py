"""Every shipped recipe runs two steps end to end, on a tiny model swapped in for its real one."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL
from lowmem.recipe import load_recipe
from lowmem.trainer import train

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


def _tiny_overrides(path: Path, tmp_path: Path) -> list[str]:
    tree = yaml.safe_load(path.read_text())
    overrides = [f"model={json.dumps({**TINY_MODEL, 'dtype': tree['model'].get('dtype', 'float32')})}",
                 "model.gradient_checkpointing=" + str(tree["model"].get("gradient_checkpointing", False)).lower(),
                 "data.max_documents=60", "train.steps=2", "train.seq_len=48", "train.batch_size=2",
                 "train.grad_accum=1", "train.eval_batches=1", "train.eval_every=1", "train.checkpoint_every=1",
                 "train.warmup_steps=0", f"output.dir={tmp_path / 'run'}"]
    if tree["data"].get("task") == "sft":  # whole byte-tokenized conversations, answers at their end
        overrides.append("train.seq_len=640")
    if tree.get("offload", {}).get("nvme_dir"):
        overrides.append(f"offload.nvme_dir={tmp_path / 'nvme'}")
    return overrides


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_runs_two_steps_on_a_tiny_model(path, tmp_path):
    recipe = load_recipe(path, _tiny_overrides(path, tmp_path))
    summary = train(recipe, progress=False)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "manifest.json").exists()
