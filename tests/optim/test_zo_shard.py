"""The perturbation of an FSDP2 row shard is its slice of the one-process draw, drawn alone
(lowmem.optim.zo_shard, lowmem.optim.zo_keyed), for every noise kind: checked here on stand-ins
that carry what ``local_shard`` attaches (the parameter and the shard's place, ``noise_span``) for
FSDP2's split of rows into ``ceil(rows / N)`` pieces (N = 2 and 3, rows not divisible, an empty
last shard), with generator chunks smaller than a shard so that shards start and end inside
chunks; the 2-process runs are in tests/integrations/test_fsdp.py."""

import pytest
import torch

import lowmem.optim.zo_keyed as zo_keyed
from lowmem.optim.zo_noise import NOISE_KINDS, Noise

SHAPE = (37, 64)  # 2368 elements: rows divide by neither 2 nor 3; more than one tile of the Philox layout
SPLITS = [(SHAPE, 2), (SHAPE, 3), ((5, 64), 4)]  # (5, 64) on 4 ranks: rows 2, 2, 1 and an empty shard


def shards(whole: torch.Tensor, n: int) -> list[tuple[slice, torch.Tensor]]:
    """``whole`` cut by rows as FSDP2's ``Shard(0)`` does (``ceil(rows / n)`` rows each, the last ones
    shorter or empty): (rows, stand-in) pairs."""
    rows = -(-whole.shape[0] // n)
    out = []
    for r in range(n):
        part = slice(min(r * rows, whole.shape[0]), min((r + 1) * rows, whole.shape[0]))
        q = whole[part].clone()
        q.sharded_param, q.noise_span = whole, (part.start * whole.shape[1], whole.numel())
        out.append((part, q))
    return out


@pytest.fixture
def small_chunks(monkeypatch):
    """Generator chunks of 100 elements and table windows of 512 (a 1024-entry table): every shard
    below crosses chunk boundaries, and the parameter spans several table windows."""
    monkeypatch.setattr(zo_keyed, "CHUNK", 100)
    monkeypatch.setattr(zo_keyed, "TABLE_SIZE", 1024)


@pytest.mark.usefixtures("small_chunks", "triton_interpreter")
@pytest.mark.parametrize("shape, n", SPLITS)
@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_shards_draw_and_update_the_one_process_slices(kind, shape, n):
    noise = Noise(kind)
    whole = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    seed = 12345
    z = noise.draw(whole, seed)
    updated = whole.clone()
    noise.update_(updated, seed, restore=1e-3, decay=0.99, alpha=-0.5)
    for part, q in shards(whole, n):
        assert torch.equal(noise.draw(q, seed), z[part])
        assert torch.equal(noise.view(q, seed), z[part])
        noise.update_(q, seed, restore=1e-3, decay=0.99, alpha=-0.5)
        torch.testing.assert_close(q, updated[part], rtol=0, atol=1e-6)  # the same operations per element
    plain = whole.clone()  # a tensor that is not a shard: its own whole z
    noise.add_(plain, seed, 2.0)
    torch.testing.assert_close(plain, whole + 2.0 * z, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_a_shard_draws_only_the_chunks_it_overlaps(kind, monkeypatch):
    """Each rank of 3 generates fewer than its elements + 2 chunks (not the whole parameter's): counted
    at the generator, where the old whole-draw-and-slice drew all 2368 elements on every rank."""
    drawn = []
    fill = zo_keyed.fill_chunk_
    monkeypatch.setattr(zo_keyed, "fill_chunk_", lambda out, seed, kind: (drawn.append(out.numel()),
                                                                           fill(out, seed, kind)))
    whole = torch.empty(*SHAPE)
    for part, q in shards(whole, 3):
        drawn.clear()
        Noise(kind).view(q, 7)
        assert sum(drawn) < q.numel() + 2 * zo_keyed.CHUNK
        assert max(drawn, default=0) <= zo_keyed.CHUNK
