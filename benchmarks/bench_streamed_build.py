"""Host peak RSS of building / loading a model into the offload tiers, streamed vs in memory (issue 25).

Each mode runs in a fresh process (``tests/offload/rss_worker.py``, the worker the test of the same bound
uses): the model is built from its config (``streamed``: blocks filled one by one as ZO2 stores them,
:mod:`lowmem.block_source`; ``in_memory``: the whole model first) or loaded from a sharded safetensors
checkpoint of it (``load_*``), and ZO2 places every block on NVMe (``host_memory_budget_gb: 0``). The peak is
VmHWM above the RSS before the build. ``MALLOC_MMAP_THRESHOLD_=65536`` as in the test: glibc otherwise
keeps freed chunks below 32 MiB in its heap (see the test's docstring).

Usage: python benchmarks/bench_streamed_build.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import markdown_table, run_json, write_result

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "offload" / "rss_worker.py"
SHAPES = {  # name -> Llama config
    "8 x 6.6 MiB blocks (the test's)": dict(hidden_size=256, intermediate_size=2048, num_hidden_layers=8,
                                            num_attention_heads=8, num_key_value_heads=2, vocab_size=256),
    "12 x 58 MiB blocks, vocab 32000": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                                            num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
}
MODES = ["streamed", "in_memory", "load_streamed", "load_in_memory"]
MIB = 2**20


def measure(config: dict, mode: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = json.dumps({"model_type": "llama", "max_position_embeddings": 64, **config})
        return run_json([sys.executable, str(WORKER), tmp, mode, "--config", cfg], env=env)[mode]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the test's shape only")
    shapes = list(SHAPES)[:1] if parser.parse_args().quick else list(SHAPES)
    load = os.getloadavg()[0]
    rows = []
    for shape in shapes:
        runs = {mode: measure(SHAPES[shape], mode) for mode in MODES}
        sizes = runs["streamed"]
        rows.append([shape, f"{sizes['units'] / MIB:.1f}", f"{sizes['block'] / MIB:.1f}",
                     *(f"{runs[m]['peak'] / MIB:.1f}" for m in MODES)])
    table = markdown_table(["model", "units MiB", "block MiB (fp32)", *(f"{m} peak MiB" for m in MODES)], rows)
    write_result("streamed_build", "Host peak of building and loading into the offload tiers (ZO2, NVMe)", table,
                 f"Load average at the start: {load:.1f}. The streamed peaks are the units plus about two blocks "
                 "(a block filled and its packed copy); the in-memory ones hold the whole model. The load rows map "
                 "the safetensors files: file pages not yet touched (most embedding rows) are not in the RSS, so "
                 "they can stay below the units' size.")


if __name__ == "__main__":
    main()
