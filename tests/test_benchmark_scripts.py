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


def test_largest_replan_puts_the_clis_plan_beside_each_kept_row(bench, monkeypatch, tmp_path, capsys):
    """``bench_largest.py --replan`` on kept rows of a tiny shape (nothing runs): each row gets the host phases and
    the files that ``lowmem-train --plan`` prints for the same recipe (the outside truth: the CLI's check), and the
    table shows each measured / planned pair, the planned figure that refused a refused row in bold."""
    import json

    import yaml

    from lowmem.cli import main as cli

    module = bench("bench_largest")
    monkeypatch.setitem(module.SHAPES, "tiny", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                                                    tie_word_embeddings=False))  # 5.5M: weights show in GiB/100
    monkeypatch.setattr(module, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(module, "ROWS", tmp_path / "rows.json")
    monkeypatch.setattr(sys.modules["_common"], "RESULTS_DIR", tmp_path)
    base = dict(shape="tiny", params_b=0.01, wall_s=1.0, load=1.0, date="2026-01-01", dtype="float32",
                seq_len=16, command="python benchmarks/bench_largest.py")
    rows = [dict(base, way="adamw", outcome="ok", disk_gb=0.001, peak_rss_gb=0.9, s_per_step=0.1,
                 phases={"build": 0.5, "eval": 0.6, "step": 0.9, "save": 0.7}),
            dict(base, way="fo_offload_nvme", disk_gb=0.0, outcome="refused: disk: the run writes 9.0 GiB (...)")]
    module.ROWS.write_text(json.dumps(rows))
    monkeypatch.setattr(sys, "argv", ["bench_largest.py", "--replan"])
    module.main()
    kept = json.loads(module.ROWS.read_text())
    assert [{k: r[k] for k in base} | {"way": r["way"]} for r in kept] == [{k: r[k] for k in base} | {"way": r["way"]}
                                                                         for r in rows]
    for row in kept:
        recipe = tmp_path / f"{row['way']}.yaml"
        recipe.write_text(yaml.safe_dump(module.recipe("tiny", row["way"], tmp_path, "float32", 16)))
        capsys.readouterr()
        assert cli([str(recipe), "--plan", "--device", "cpu"]) == 0
        out = capsys.readouterr().out.splitlines()
        host = next(x for x in out if "host peak RSS by phase: " in x).split(": ", 1)[1].split(", ")
        assert {p.split()[0]: float(p.split()[1]) for p in host} == pytest.approx(row["plan"]["phases"], abs=0.006)
        disk = next(x for x in out if x.startswith("  disk: ")).split(": ", 1)[1].split(", ")
        assert sum(float(x.split(" GiB")[0].split()[-1]) for x in disk) == pytest.approx(row["plan"]["disk_gib"],
                                                                                        abs=0.011)
    table = (tmp_path / "largest.md").read_text()
    ok, refused = (next(x for x in table.splitlines() if x.startswith(f"| {module.WAYS[w][0]} ")) for w in
                   ("adamw", "fo_offload_nvme"))
    step = kept[0]["plan"]["phases"]["step"]
    assert f"| 0.90 / {step:.2f} |" in ok and f"step {step / 0.9 - 1:+.0%}".replace("-", "\u2212") in ok
    assert f"| - / **{kept[1]['plan']['disk_gib']:.2f}** |" in refused
