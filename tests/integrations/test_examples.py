"""The integration example runs (tiny config model, a few steps) for a first-order optimizer with
layer-wise mode and WTA-CRS, and for MeZO through ZOTrainer; the accelerate commands of
examples/accelerate_ddp.md are exercised by test_ddp.py."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_apollo.py"


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer_apollo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra, holds_state", [
    (["--layerwise", "--wta-crs", "0.5", "--lr", "1e-3"], True),  # APOLLO-Mini moments
    (["--optimizer", "mezo", "--lr", "1e-4"], False),  # MeZO without momentum: no state tensor
])
def test_hf_trainer_example_runs_tiny(tmp_path, extra, holds_state):
    summary = _example().main(["--tiny", "--steps", "4", "--seq-len", "64", "--output-dir", str(tmp_path)] + extra)
    assert summary["steps"] == 4
    assert summary["eval_loss"] < summary["eval_loss_before"]
    assert (summary["optimizer_state_mb"] > 0) == holds_state
