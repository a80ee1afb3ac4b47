"""Stream/event ordering of the ZO2 schedule and pinned host memory, checked on the CPU with a
recorder standing in for ``torch.cuda`` (streams, events) and for ``cudaHostRegister``."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from lowmem.offload import streams
from lowmem.offload.store import BlockStore
from tests.offload.helpers import batches, engine


class FakeEvent:
    def __init__(self, rec):
        self.rec, self.stream, self.synced, self.on_sync = rec, None, False, None

    def record(self, stream):
        self.stream = stream.name
        self.rec.log.append(("record", stream.name, self))

    def synchronize(self):
        if self.on_sync is not None:
            self.on_sync()
        self.synced = True
        self.rec.log.append(("sync", None, self))


class FakeStream:
    def __init__(self, rec, name):
        self.rec, self.name = rec, name

    def wait_event(self, event):
        self.rec.log.append(("wait", self.name, event))


class Recorder:
    """The part of ``torch.cuda`` the lanes use; logs every record, wait and host sync in order."""

    def __init__(self):
        self.log, self._ids = [], itertools.count()
        self.current = FakeStream(self, "default")

    def Stream(self, device):  # noqa: N802 -- torch.cuda's name
        return FakeStream(self, f"side{next(self._ids)}")

    def current_stream(self, device):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        before, self.current = self.current, s
        try:
            yield
        finally:
            self.current = before

    def Event(self):  # noqa: N802
        return FakeEvent(self)


@pytest.fixture
def rec(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(streams, "BACKEND", recorder)
    monkeypatch.setattr(streams, "uses_streams", lambda device: True)
    return recorder


def test_compute_lane_uses_the_stream_current_at_each_call(rec):
    lanes = streams.Lanes(torch.device("cpu"))
    first = lanes.compute.record()
    rec.current = FakeStream(rec, "user")  # e.g. a step run under the caller's torch.cuda.stream(...)
    second = lanes.compute.record()
    lanes.compute.wait(first)
    assert (first.stream, second.stream) == ("default", "user")
    assert rec.log[-1] == ("wait", "user", first)
    assert lanes.upload.stream is lanes.upload.stream and lanes.upload.stream.name.startswith("side")


def _lane_names(eng):
    lanes = eng.mover.lanes
    return {"upload": lanes.upload.stream.name, "offload": lanes.offload.stream.name, "compute": "default"}


def test_step_orders_upload_compute_offload_and_slot_reuse(rec, tiny_model):
    _, eng = engine(tiny_model, arch="llama", layers=5)
    names = _lane_names(eng)
    for batch in batches(2):
        eng.step(batch)
    eng.flush()
    waits = [(lane, ev.stream) for kind, lane, ev in rec.log if kind == "wait"]
    assert waits, "the schedule waited on nothing"
    by_lane = {lane: {src for l2, src in waits if l2 == lane} for lane in names.values()}
    assert by_lane[names["compute"]] == {names["upload"]}             # compute waits for the block's upload
    assert by_lane[names["offload"]] == {names["compute"]}            # offload waits for the compute
    assert by_lane[names["upload"]] <= {names["offload"], names["compute"]}  # a slot is reused after its last use
    assert names["offload"] in by_lane[names["upload"]]
    # every event is waited on only after it was recorded
    recorded = set()
    for kind, _, ev in rec.log:
        if kind == "record":
            recorded.add(id(ev))
        else:
            assert id(ev) in recorded


def test_put_after_an_upload_only_pass_waits_for_the_uploads(rec, tiny_model):
    _, eng = engine(tiny_model, arch="llama", layers=4)
    data = batches(2)
    eng.step(data[0])
    eng.eval_loss(data[1])  # flush (writes back), then a forward that only uploads
    upload = _lane_names(eng)["upload"]
    last_pass = [ev for kind, lane, ev in rec.log if kind == "record" and lane == upload][-len(eng.packed):]
    assert not any(ev.synced for ev in last_pass)
    state = eng.model_state_dict()
    eng.load_model_state_dict(state)  # host-side writes into every block
    assert all(ev.synced for ev in last_pass)


def test_store_put_syncs_the_upload_before_writing():
    store = BlockStore([8], torch.float32, budget_bytes=None, nvme_dir=None, pin=False, prefetch_depth=1)
    store.put(0, torch.zeros(8))
    event = FakeEvent(Recorder())
    seen = []
    event.on_sync = lambda: seen.append(store._host[0].clone())
    store.fetch(0).result().release(event)  # an upload from the block is queued with `event`
    store.put(0, torch.ones(8))
    assert event.synced and torch.equal(seen[0], torch.zeros(8))  # waited while the old data was there
    assert torch.equal(store.get(0), torch.ones(8))


@pytest.fixture
def registry(monkeypatch):
    pinned = {}
    monkeypatch.setattr(streams.HostMemory, "register",
                        staticmethod(lambda t: pinned.__setitem__(t.data_ptr(), t.numel() * t.element_size())))
    monkeypatch.setattr(streams.HostMemory, "unregister", staticmethod(lambda t: pinned.pop(t.data_ptr())))
    return pinned


def test_pinned_store_registers_exact_sizes_and_frees_block_by_block(registry, tmp_path):
    numels = [1000, 3001, 513]
    store = BlockStore(numels, torch.bfloat16, budget_bytes=2 * (1000 + 3001), nvme_dir=str(tmp_path),
                       pin=True, prefetch_depth=1)
    for i, n in enumerate(numels):
        store.put(i, torch.full((n,), float(i), dtype=torch.bfloat16))
    blocks = sorted(v for v in registry.values())
    # host tier: the two blocks at their exact byte size; NVMe tier: 3 read + 2 write staging buffers of 513
    assert blocks == sorted([2000, 6002] + [1026] * 5)
    assert store.memory.pinned_bytes == sum(blocks)
    taken = store.take(1)
    assert torch.equal(taken, torch.full((3001,), 1.0, dtype=torch.bfloat16))
    assert sorted(registry.values()) == sorted([2000] + [1026] * 5) and 1 not in store._host
    assert torch.equal(store.take(2), torch.full((513,), 2.0, dtype=torch.bfloat16))  # NVMe: read back
    store.close()
    assert registry == {}


def test_close_hands_back_the_host_blocks_without_a_copy(tiny_model):
    model, eng = engine(tiny_model, arch="llama", layers=3)
    eng.step(batches(1)[0])
    eng.flush()
    expected = eng.model_state_dict()
    buffers = {i: t.data_ptr() for i, t in eng.store._host.items()}
    eng.close()
    assert eng.store._host == {}
    for name, t in model.state_dict().items():
        assert torch.equal(t, expected[name]), name
    first = next(iter(eng.packed[0].params))
    assert first.data_ptr() == buffers[0]


def test_pinned_memory_falls_back_when_registration_is_refused(monkeypatch):
    def refuse(t):
        raise RuntimeError("cudaHostRegister: not supported")

    unpinned = []
    monkeypatch.setattr(streams.HostMemory, "register", staticmethod(refuse))
    monkeypatch.setattr(streams.HostMemory, "unregister", staticmethod(unpinned.append))
    monkeypatch.setattr(streams.HostMemory, "pinned_empty", staticmethod(lambda n, dtype: torch.zeros(n, dtype=dtype)))
    memory = streams.HostMemory(pin=True)
    a, b = memory.empty(100, torch.float32), memory.empty(50, torch.float16)
    assert memory.fallback and memory.pinned_bytes == 400 + 100
    assert memory.release(a) is a and memory.pinned_bytes == 100 and unpinned == []
    memory.close()
    assert memory.pinned_bytes == 0 and unpinned == []
