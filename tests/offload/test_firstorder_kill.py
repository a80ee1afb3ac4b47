"""A SIGKILL while a block's master or its optimizer state is being written leaves a resumable run:
files are replaced atomically, and a run resumes from its last checkpoint bit for bit."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowmem import checkpoint as ckpt
from lowmem.offload.firstorder import FirstOrderEngine
from tests.conftest import _tiny_config
from tests.offload.fo_helpers import assert_same_state, optimizer
from tests.offload.helpers import assert_same_weights, batches

_ROOT = Path(__file__).resolve().parents[2]

# The child trains 2 steps, checkpoints, then dies (SIGKILL from the test) inside a file write of step 3.
_CHILD = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    import lowmem.offload.fo_state as fo_state, lowmem.offload.store as store
    from tests.offload.test_firstorder_kill import build, save, batches

    run, what = Path(sys.argv[1]), sys.argv[2]
    eng = build(run / "nvme")
    for b in batches(2):
        eng.step(lambda: eng.model(**b).loss)
    save(eng, run)
    real = store.write_block_file

    def torn(path, payload, version, durable=False):  # half of the temp file, then hang
        tmp = path.with_name(path.name + ".tmp")
        data = payload.view(torch.uint8).numpy().tobytes()
        tmp.write_bytes(b"LMZO2BLK" + data[: len(data) // 2])
        print("writing", path.name, flush=True)
        time.sleep(600)

    (fo_state if what == "state" else store).write_block_file = torn
    b = batches(3)[2]
    eng.step(lambda: eng.model(**b).loss)
""")


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_tiny_config("llama", True, 3)).train()


def build(nvme: Path, seed: int = 0) -> FirstOrderEngine:
    model = _model(seed)
    return FirstOrderEngine(model, optimizer(model, "adamw8bit"), dict(nvme_dir=str(nvme), host_memory_budget_gb=0.0),
                            device="cpu")


def save(eng: FirstOrderEngine, run: Path) -> None:
    """A checkpoint streamed from the tiers, as the trainer writes it (weights and state block by block)."""
    names = {n for n, p in eng.model.named_parameters()}
    with eng.checkpoint_state.placeholders():
        ckpt.save_checkpoint(run, eng.steps, weights=eng.checkpoint_parts(names), optimizer=eng.optimizer,
                             extra={"offload": {"steps": eng.steps}}, optimizer_parts=eng.checkpoint_state.parts)


def resume(eng: FirstOrderEngine, run: Path) -> None:
    """Read back as the trainer does: lazily, each block's weights and state into its tier in turn (tied
    lm_head: its weight is the embedding's, loaded under that name)."""
    with eng.loading_state():
        extra = ckpt.load_checkpoint(ckpt.latest_checkpoint(run), optimizer=eng.optimizer,
                                     load_weights=lambda weights: eng.load_model_state_dict(weights, partial=True),
                                     load_optimizer=eng.checkpoint_state.load)
    eng.steps = extra["offload"]["steps"]


@pytest.mark.parametrize("what", ["state", "block"])
def test_sigkill_mid_write_resumes_exactly(tmp_path, what, monkeypatch):
    # the PyTorch kernels, not Triton's CPU interpreter (2-3x the CPU time), in this process and the child (whose
    # import of tests.conftest keeps a set value): the child, the resumed engine and the reference take the same
    # path; test_bit_identical_to_layerwise[adamw8bit-host-untied] keeps the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    data = batches(4)
    straight = build(tmp_path / "straight")
    for b in data:
        straight.step(lambda b=b: straight.model(**b).loss)

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(run), what], stdout=subprocess.PIPE, cwd=_ROOT, env=env)
    line = proc.stdout.readline().decode()
    assert line.startswith("writing"), line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((run / "nvme").glob("*.lmz.tmp"))  # the kill left a torn temp file ...

    eng = build(run / "nvme", seed=3)  # ... which the new engine removes; every value comes from the checkpoint
    assert not list((run / "nvme").glob("*.lmz.tmp"))
    resume(eng, run)
    assert eng.steps == 2
    for b in data[2:]:
        eng.step(lambda b=b: eng.model(**b).loss)
    assert_same_weights(eng.model_state_dict(), straight.model_state_dict())
    assert_same_state(straight.state_dict()["optimizer"]["state"], eng.state_dict()["optimizer"]["state"])
