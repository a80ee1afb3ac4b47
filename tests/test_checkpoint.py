"""Checkpoints: exact resume, optimizer-state fidelity, SIGKILL safety, corruption, keep_last (issue #2)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file, save

from lowmem.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from lowmem.state_encoding import optimizer_state_from_tensors, optimizer_state_to_tensors


def assert_same(a, b, where="root"):
    """Equal values of identical types; tensors equal in dtype, shape and bits."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------- 1. exact resume
def _setup(tiny_model, seed):
    model = tiny_model(tied=True, seed=seed)
    model.model.norm.weight.requires_grad_(False)  # a frozen weight: not saved, not touched
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched, torch.Generator().manual_seed(seed + 100)


def _train(model, opt, sched, gen, steps):
    """Every RNG feeds the loss: the private generator picks the batch, the global ones scale it."""
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=gen)
        scale = 1 + torch.rand(()).item() + np.random.rand() + random.random()
        loss = model(input_ids=ids, labels=ids).loss * scale
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _seed_globals(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_resume_is_bit_identical(tmp_path, tiny_model):
    _seed_globals(0)
    model, opt, sched, gen = _setup(tiny_model, 0)
    _train(model, opt, sched, gen, 3)
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched,
                           generator_states={"zo": [gen.get_state()]}, extra={"data_position": 6, "shape": (2, 16)})
    assert path == tmp_path / "checkpoints" / "step-00000003"
    want = _train(model, opt, sched, gen, 3)

    _seed_globals(1)  # everything different: weights, optimizer state, scheduler, RNGs, generator
    model2, opt2, sched2, gen2 = _setup(tiny_model, 1)
    _train(model2, opt2, sched2, gen2, 1)
    info = load_checkpoint(latest_checkpoint(tmp_path), model=model2, optimizer=opt2, scheduler=sched2,
                           generators={"zo": gen2})
    assert info == {"step": 3, "data_position": 6, "shape": (2, 16)}
    got = _train(model2, opt2, sched2, gen2, 3)
    assert got == want
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    assert_same(opt.state_dict(), opt2.state_dict())
    assert sched.state_dict() == sched2.state_dict()


def test_saves_trainable_weights_once_and_leaves_others(tmp_path, tiny_model):
    model, opt, sched, gen = _setup(tiny_model, 0)
    path = save_checkpoint(tmp_path, 0, model=model, optimizer=opt)
    saved = load_file(path / "model.safetensors")
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.norm.weight" not in saved and "lm_head.weight" not in saved  # frozen; tied to the embedding
    model2, opt2, _, _ = _setup(tiny_model, 1)
    frozen = model2.model.norm.weight.detach().clone()
    load_checkpoint(path, model=model2, optimizer=opt2)
    assert torch.equal(model2.model.norm.weight, frozen)
    assert torch.equal(model2.lm_head.weight, model.model.embed_tokens.weight)
    with pytest.raises(CheckpointError, match="no state for generator 'zo'"):
        load_checkpoint(path, model=model2, optimizer=opt2, generators={"zo": gen})


def test_each_rank_resumes_its_own_generator(tmp_path, tiny_model):
    """Per-process generators (WTA-CRS under DDP): the writer stores every rank's state, each rank
    loads its own; another number of processes is refused before anything is restored."""
    model, opt, _, _ = _setup(tiny_model, 0)
    ranks = [torch.Generator().manual_seed(10 + r) for r in range(2)]
    for r, gen in enumerate(ranks):
        torch.rand(r + 3, generator=gen)  # states that differ from any fresh seed
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt,
                           generator_states={"wta_crs": [g.get_state() for g in ranks]})
    want = [torch.rand(4, generator=g) for g in ranks]
    for r in range(2):
        gen = torch.Generator().manual_seed(99)
        load_checkpoint(path, model=model, optimizer=opt, generators={"wta_crs": gen}, rank=r, world_size=2)
        assert torch.equal(torch.rand(4, generator=gen), want[r]), r

    model2, opt2, _, _ = _setup(tiny_model, 1)
    before = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(CheckpointError, match=r"rng\.safetensors: .* saved by 2 processes, this run has 1") as err:
        load_checkpoint(path, model=model2, optimizer=opt2, generators={"wta_crs": torch.Generator()})
    assert "\n" not in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters()))  # refused before restoring
    with pytest.raises(CheckpointError, match="one state per process"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt,
                        generator_states={"a": [ranks[0].get_state()], "b": [g.get_state() for g in ranks]})
    with pytest.raises(CheckpointError, match="get_state.. of every process, in a list"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, generator_states={"a": ranks[0]})


# ---------------------------------------------------------------- 2. optimizer-state fidelity
def test_optimizer_state_round_trip_keeps_types(tiny_model, tiny_batch):
    model = tiny_model()
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named[:3]], "param_names": [n for n, _ in named[:3]], "betas": (0.9, 0.99)},
              {"params": [p for _, p in named[3:]], "param_names": [n for n, _ in named[3:]], "weight_decay": 0.0,
               "betas": [0.5, 0.6]}]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    model(**tiny_batch()).loss.backward()
    opt.step()
    opt.state[named[0][1]].update(flag=True, nothing=None, count=7)
    original = opt.state_dict()
    # strings and tuples in state: torch's own load_state_dict mangles them, but the encoding must not
    rich = {"state": {**original["state"], 99: {"name": "x", "nested": ([1, 2.5], {"k": (3,)})}},
            "param_groups": original["param_groups"]}
    tensors, meta = optimizer_state_to_tensors(rich)
    assert tensors["state.0.step"].dim() == 0
    tensors, meta = load(save(tensors)), json.loads(json.dumps(meta))  # through the real file formats
    assert_same(optimizer_state_from_tensors(tensors, meta), rich)

    tensors, meta = optimizer_state_to_tensors(original)
    tensors, meta = load(save(tensors)), json.loads(json.dumps(meta))
    fresh = torch.optim.AdamW(groups, lr=5.0, betas=(0.1, 0.2))
    fresh.load_state_dict(optimizer_state_from_tensors(tensors, meta))
    assert_same(fresh.state_dict(), original)


def test_load_checkpoint_keeps_saved_state_dtypes(tmp_path, tiny_model):
    """torch's load_state_dict casts float-param state to the param dtype; 8-bit codes must stay uint8."""
    model, opt, sched, gen = _setup(tiny_model, 0)
    _train(model, opt, sched, gen, 1)
    opt.state[opt.param_groups[0]["params"][0]]["codes"] = torch.arange(7, dtype=torch.uint8)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    model2, opt2, _, _ = _setup(tiny_model, 1)
    load_checkpoint(path, model=model2, optimizer=opt2)
    assert_same(opt2.state_dict(), opt.state_dict())


def test_non_tensor_state_is_refused_with_its_key():
    with pytest.raises(CheckpointError, match=r"state\.0\.projector: cannot store a object"):
        optimizer_state_to_tensors({"state": {0: {"projector": object()}}, "param_groups": []})


# ---------------------------------------------------------------- 3. SIGKILL at random moments
_WRITER = """
import os, sys, torch
torch.set_num_threads(1)
from lowmem.checkpoint import save_checkpoint
run = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(640, 640), torch.nn.Linear(640, 640))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
def step():
    model(torch.randn(4, 640)).square().mean().backward()
    opt.step()
    opt.zero_grad()
step()
save_checkpoint(run, 0, model=model, optimizer=opt, keep_last=2)
for round in range(1, 1000):
    if not sys.stdin.readline():
        break
    pid = os.fork()
    if pid == 0:  # the child saves until it is killed
        for i in range(1, 10_000):
            step()
            save_checkpoint(run, round * 10_000 + i, model=model, optimizer=opt, keep_last=2)
        os._exit(0)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def _fresh_pair():
    model = torch.nn.Sequential(torch.nn.Linear(640, 640), torch.nn.Linear(640, 640))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_sigkill_never_loses_the_last_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_WRITER))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    rng = random.Random(0)
    steps_seen = set()
    try:
        for _ in range(10):
            proc.stdin.write("\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            time.sleep(rng.uniform(0.05, 0.5))
            os.kill(int(line), signal.SIGKILL)
            assert proc.stdout.readline() == "reaped\n"  # the child is gone: nothing writes any more
            latest = latest_checkpoint(run)
            assert latest is not None
            model, opt = _fresh_pair()
            info = load_checkpoint(latest, model=model, optimizer=opt)  # verifies every checksum
            assert info["step"] == int(latest.name.split("-")[1])
            steps_seen.add(info["step"])
            complete = [d for d in (run / "checkpoints").iterdir() if (d / "manifest.json").exists()]
            assert len(complete) <= 3  # keep_last=2, plus one if killed between rename and pruning
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert len(steps_seen) >= 3, steps_seen  # the kills hit a writer that was making progress
    model, opt = _fresh_pair()
    save_checkpoint(run, 10**7, model=model, optimizer=opt, keep_last=2)
    left = sorted(d.name for d in (run / "checkpoints").iterdir())
    assert len(left) == 2 and left[-1] == "step-10000000", left  # temp dirs from the kills are gone


# ---------------------------------------------------------------- 4. corruption
def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-3])


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json"])
@pytest.mark.parametrize("damage", [_flip, _truncate, os.remove])
def test_damaged_file_is_named_in_a_one_line_error(tmp_path, tiny_model, name, damage):
    model, opt, sched, gen = _setup(tiny_model, 0)
    path = save_checkpoint(tmp_path, 5, model=model, optimizer=opt, scheduler=sched)
    damage(path / name)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    assert str(path / name) in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_without_valid_manifest_is_ignored(tmp_path, tiny_model):
    model, opt, _, _ = _setup(tiny_model, 0)
    old = save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    new = save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    (new / "manifest.json").write_text('{"format": 1, "fi')
    assert latest_checkpoint(tmp_path) == old
    (new / "manifest.json").unlink()
    assert latest_checkpoint(tmp_path) == old
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(new, model=model, optimizer=opt)
    assert str(new / "manifest.json") in str(err.value) and "\n" not in str(err.value)
    assert latest_checkpoint(tmp_path / "nothing-here") is None


# ---------------------------------------------------------------- 5. keep_last and temp dirs
def test_keep_last_and_temp_dirs_cleaned(tmp_path, tiny_model):
    model, opt, _, _ = _setup(tiny_model, 0)
    root = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, keep_last=3)
    stale = root / ".tmp-step-00000099-12345"  # what a kill mid-write leaves behind
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    for step in range(2, 7):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, keep_last=3)
    assert sorted(d.name for d in root.iterdir()) == ["step-00000004", "step-00000005", "step-00000006"]
    save_checkpoint(tmp_path, 6, model=model, optimizer=opt, keep_last=1)  # same step again: replaced
    assert sorted(d.name for d in root.iterdir()) == ["step-00000006"]
    with pytest.raises(CheckpointError, match="keep_last must be >= 1"):
        save_checkpoint(tmp_path, 7, model=model, optimizer=opt, keep_last=0)
    with pytest.raises(CheckpointError, match="must not have a 'step' key"):
        save_checkpoint(tmp_path, 7, model=model, optimizer=opt, extra={"step": 3})
    assert sorted(d.name for d in root.iterdir()) == ["step-00000006"]  # refused saves leave nothing behind
