"""NVMe block files: checksums, one-line errors naming the file, atomic replacement under SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lowmem.offload.store import PAYLOAD_OFFSET, BlockStore, read_block_file, write_block_file
from tests.offload.helpers import batches, engine


def test_round_trip_and_version(tmp_path):
    data = torch.randn(1000)
    write_block_file(tmp_path / "b.lmz", data, version=42)
    out = torch.empty(1000)
    assert read_block_file(tmp_path / "b.lmz", out) == 42
    assert torch.equal(out, data)


@pytest.mark.parametrize("damage,message", [("flip", "checksum mismatch"), ("truncate", "truncated"),
                                            ("header", "not a lowmem block file"), ("delete", "missing")])
def test_damaged_file_one_line_error(tmp_path, damage, message):
    path = tmp_path / "b.lmz"
    write_block_file(path, torch.randn(1000), version=1)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[PAYLOAD_OFFSET + 123] ^= 0x10
    elif damage == "truncate":
        raw = raw[:-7]
    elif damage == "header":
        raw[0:8] = b"XXXXXXXX"
    path.write_bytes(bytes(raw))
    if damage == "delete":
        path.unlink()
    with pytest.raises(ValueError) as err:
        read_block_file(path, torch.empty(1000))
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_engine_reports_corrupt_block_file(tiny_model, tmp_path):
    _, eng = engine(tiny_model, dict(nvme_dir=str(tmp_path), host_memory_budget_gb=0.0), arch="llama", layers=3)
    data = batches(2)
    eng.step(data[0])
    eng.store.drain()
    path = eng.store.path(1)
    raw = bytearray(path.read_bytes())
    raw[PAYLOAD_OFFSET + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"^{path}: checksum mismatch$"):
        eng.step(data[1])


_WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from lowmem.offload.store import write_block_file
    path, n = Path(sys.argv[1]), int(sys.argv[2])
    version = 1
    print("ready", flush=True)
    while True:  # version v holds the value v everywhere
        write_block_file(path, torch.full((n,), float(version)), version)
        version += 1
""")


def test_sigkill_during_writes_leaves_a_complete_version(tmp_path):
    n = 4 << 20  # 16 MB per write: a kill lands mid-write most of the time
    path = tmp_path / "block_00000.lmz"
    write_block_file(path, torch.zeros(n), version=0)
    for delay in (0.05, 0.2, 0.45):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(n)], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        out = torch.empty(n)
        version = read_block_file(path, out)  # never torn: the old or the new complete file
        assert torch.equal(out, torch.full((n,), float(version)))
    # a store opening the directory removes the stale temp file and resumes from the file
    store = BlockStore([n], torch.float32, budget_bytes=0, nvme_dir=str(tmp_path), pin=False, prefetch_depth=1)
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.equal(store.get(0), out)
    store.close()
