"""Shared set-up of the offload tests: a model pair (reference in memory, engine-driven), batches, and a
script run in a fresh process for its peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem.offload.engine import ZO2Engine
from lowmem.optim import create_optimizer

HP = dict(lr=1e-3, eps=1e-3, weight_decay=0.1, seed=7)


def batches(n: int, batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def reference(tiny_model, hp: dict | None = None, **model_kw):
    """In-memory MeZO (lowmem.optim.mezo), the outside truth; eval mode as the trainer runs ZO."""
    model = tiny_model(**model_kw).eval()
    return model, create_optimizer(model, "mezo", **{**HP, **(hp or {})})


def engine(tiny_model, config: dict | None = None, hp: dict | None = None,
           **model_kw) -> tuple[torch.nn.Module, ZO2Engine]:
    model = tiny_model(**model_kw)
    opt = create_optimizer(model, "mezo", **{**HP, **(hp or {})})
    return model, ZO2Engine(model, opt, config or {}, device="cpu")


def ref_step(model, opt, batch) -> torch.Tensor:
    return opt.step(lambda: model(**batch).loss)


def assert_same_weights(state: dict, model_or_state) -> None:
    ref = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    assert state.keys() == ref.keys()
    bad = [k for k in ref if not torch.equal(state[k], ref[k])]
    assert not bad, f"weights differ from in-memory MeZO: {bad[:4]}"


def fresh_process_json(script: str, *args: str) -> dict:
    """Run ``script`` (Python source) in a fresh process from the repository root, so its allocator and peak
    RSS are its own, and return the JSON object of its last line of output; skipped where Linux's
    ``/proc/self/clear_refs`` (which resets the peak, VmHWM) is missing."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
