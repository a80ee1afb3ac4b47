"""The large recipes' hub models (issue 24): their configs ship with lowmem, so ``--plan`` needs no hub; a hub
model that cannot be reached is one line naming ``model.path``, at once, not after half a minute of retries.

Outside truths: the models' published sizes (Llama-3-8B 8,030,261,248 parameters and Llama-3.2-1B
1,235,814,400, as their hub safetensors index them; OPT-30B: 48 layers, 56 heads, d_model 7168 in Zhang et al.
2022, Table 1, about 30B parameters). Here each large recipe's config resolves offline and builds the published
model on fake tensors; the trace that follows in ``--plan`` is the planner's own (tests/test_planner*.py) and takes
0.5 to 2 minutes per large recipe on 2 busy cores, too long for CI (run offline by hand for each of them).
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem.models import model_source
from lowmem.planner import model_config
from lowmem.recipe import load_recipe
from lowmem.planner import fake_model

RECIPES = Path(__file__).parents[2] / "recipes"
LARGE = {"llama3-8b-apollo-mini.yaml": 8_030_261_248, "llama3-8b-offload-adamw.yaml": 8_030_261_248,
         "llama3-8b-zo2.yaml": 8_030_261_248, "llama-1b-galore.yaml": 1_235_814_400,
         "opt-30b-zo2.yaml": None, "opt-30b-zo2-topic.yaml": None}


@pytest.fixture(scope="module")
def sizes():
    """Parameter count of each large recipe's model, built from the config resolved offline, on fake tensors."""
    counts, built = {}, {}
    for name in LARGE:
        recipe = load_recipe(RECIPES / name)
        if recipe.model.path not in built:
            config = model_config(recipe.model)
            with FakeTensorMode(allow_non_fake_inputs=True):
                params = {id(p): p for p in fake_model(recipe.model, config).parameters()}.values()
                built[recipe.model.path] = (config, sum(p.numel() for p in params))
        counts[name] = built[recipe.model.path]
    return counts


@pytest.mark.parametrize("name", LARGE)
def test_large_recipe_models_build_offline_from_the_shipped_configs(name, sizes):
    config, count = sizes[name]
    if LARGE[name] is not None:
        assert count == LARGE[name]
    else:
        assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (48, 56, 7168)
        assert 29.9e9 < count < 30.1e9


def _recipe(tmp_path, model_path: str) -> Path:
    tree = yaml.safe_load((RECIPES / "llama3-8b-apollo-mini.yaml").read_text())
    tree["model"]["path"] = model_path
    tree["output"]["dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_unreachable_hub_model_is_one_line_at_once(tmp_path):
    """Offline (HF_HUB_OFFLINE=1, as the tests run), a run of a Meta model not in the cache stops in one line
    that names model.path and the id, says it is gated and how to go on offline; no retries (no wall-clock bound
    here: a CLI subprocess takes 5 to 35 s on the shared CI cores just to import torch)."""
    proc = subprocess.run([sys.executable, "-m", "lowmem.cli", str(_recipe(tmp_path, "meta-llama/Meta-Llama-3-8B")),
                           "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lowmem-train: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in ("model.path", "'meta-llama/Meta-Llama-3-8B'", "HF_HUB_OFFLINE", "gated", "model.path=DIR",
                   "--plan"):
        assert needle in errors[0], errors[0]
    assert "Retrying" not in proc.stderr  # huggingface_hub's retry notice (the timing: the in-process test below)


def test_unreachable_endpoint_fails_fast(monkeypatch):
    """Not offline, but the hub's endpoint refuses connections: one connection attempt, not five retries."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"^model\.path: 'facebook/opt-30b' is a hub id .* cannot be reached") as err:
        model_source("facebook/opt-30b", "model.path")
    assert time.perf_counter() - start < 5
    assert "gated" not in str(err.value) and "\n" not in str(err.value)
    assert model_source(str(RECIPES), "model.path") == str(RECIPES)  # a local directory is never checked

