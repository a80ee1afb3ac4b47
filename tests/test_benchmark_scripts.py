"""Benchmark scripts' GPU-independent logic (issue #18): the CPU table of bench_adamw8bit without
bitsandbytes, and run_all's GPU commands."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str):
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return load


def test_adamw8bit_cpu_table_without_bitsandbytes(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
    module = bench("bench_adamw8bit")
    assert list(module.providers("cpu")) == ["lowmem AdamW8bit", "torch AdamW"]
    table = module.memory_table(32, 1, 300)
    assert "lowmem AdamW8bit" in table and "torch AdamW" in table and "bitsandbytes" not in table


def test_run_all_runs_the_gpu_benchmarks_on_a_gpu(bench):
    run_all = bench("run_all")
    names = lambda cmds: [" ".join(Path(c).name for c in cmd[1:]) for cmd in cmds]  # noqa: E731
    on_gpu = names(run_all.commands(False, ["bench_zo2"], cuda=True))
    assert on_gpu == ["bench_zo2.py", "bench_zo2.py --gpu"]
    everything = names(run_all.commands(True, [], cuda=True))
    assert "bench_zo2.py --gpu" in everything and everything[-1] == "gpu_proof.py results"
    assert not any("--gpu" in c or "gpu_proof" in c for c in names(run_all.commands(True, [], cuda=False)))
