"""DeepSpeed: the combination rules (pure, always run) and real ZeRO-2 and ZeRO-3 + offload runs
with a lowmem optimizer in a ``transformers.Trainer`` (one process; marked, skipped visibly
without deepspeed), compared with the same Trainer run without DeepSpeed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from lowmem.integrations import (LowMemCallback, check_deepspeed_combination, refuse_deepspeed_launch,
                                 trainer_optimizer)

from .helpers import TokenDataset

WORKER = Path(__file__).with_name("deepspeed_worker.py")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

# (stage, optimizer, options, None if it works else a fragment of the one-line error); README table
TABLE = [
    (0, "galore_adamw", {}, None),
    (0, "apollo_mini", {"mixed_precision": "bf16"}, "flat 1-D partitions"),
    (0, "adamw8bit", {}, None),
    (1, "adamw", {}, None),
    (2, "adamw", {"mixed_precision": "bf16", "offload_optimizer": True}, None),
    (2, "apollo", {}, "projects 2-D weight matrices"),
    (2, "frugal", {}, "projects 2-D weight matrices"),
    (2, "adamw8bit", {}, "chooses its state storage per tensor"),
    (3, "adamw", {"offload_param": True, "offload_optimizer": True}, None),
    (2, "adamw", {"offload_param": True}, "parameter offload needs ZeRO-3"),
    (3, "mezo", {}, "zeroth-order"),
    (0, "zo_adamu", {}, "zeroth-order"),
    (2, "adamw", {"layerwise": True}, "layer-wise"),
    (2, "adamw", {"wta_crs": True}, None),
    (3, "adamw", {"wta_crs": True}, "WTA-CRS"),
    (4, "adamw", {}, "stage must be"),
]


@pytest.mark.parametrize("stage, name, options, error", TABLE)
def test_combination_rules(stage, name, options, error):
    if error is None:
        check_deepspeed_combination(stage, name, **options)
        return
    with pytest.raises(ValueError, match=error) as err:
        check_deepspeed_combination(stage, name, **options)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("plugin, env, error", [
    (None, "false", None),
    (None, "true", "drops DeepSpeed on a CPU-only machine"),
    (object(), "true", "steps the optimizer"),
])
def test_lowmem_train_refuses_deepspeed_launch(monkeypatch, plugin, env, error):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", env)
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    if error is None:
        refuse_deepspeed_launch(accelerator)
        return
    with pytest.raises(ValueError, match=error) as err:
        refuse_deepspeed_launch(accelerator)
    assert "\n" not in str(err.value)


def _run_worker(out: Path, zero: dict, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(WORKER), str(out), json.dumps(zero), name], env=env,
                          capture_output=True, text=True, timeout=500)


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'lowmem[deepspeed]')")
@pytest.mark.parametrize("zero", [
    {"stage": 2},
    {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
])
def test_zero_trains_like_plain_trainer(tmp_path, tiny_model, trainer_args, zero):
    done = _run_worker(tmp_path / "ds", zero, "adamw")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    trained = load_file(tmp_path / "ds" / "weights.safetensors")

    model = tiny_model()
    Trainer(model=model, args=trainer_args(), train_dataset=TokenDataset(),
            optimizer_cls_and_kwargs=trainer_optimizer("adamw", lr=1e-2), callbacks=[LowMemCallback()]).train()
    initial = tiny_model().state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-5)  # Adam amplifies rounding where g ~ 0
    assert max((model.state_dict()[k] - v).abs().max().item() for k, v in initial.items()) > 1e-3  # it trained

    refused = _run_worker(tmp_path / "ds_galore", zero, "galore_adamw")
    assert refused.returncode == 2
    assert f"error: DeepSpeed ZeRO-{zero['stage']} with 'galore_adamw'" in refused.stderr
