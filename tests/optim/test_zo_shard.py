"""The perturbation of an FSDP2 row shard is its slice of the one-process draw (lowmem.optim.zo_shard),
for every noise kind: checked here on stand-ins that carry what ``local_shard`` attaches (the whole
parameter and the shard's first flat position), with a parameter larger than one generator chunk so
the chunked kinds cross a chunk boundary inside a shard; the 2-process runs are in
tests/integrations/test_fsdp.py."""

import pytest
import torch

from lowmem.optim.zo_noise import CHUNK, NOISE_KINDS, Noise
from lowmem.optim.zo_shard import ShardedNoise

# one generator chunk and a bit: the second of 2 shards crosses the chunk boundary (philox has no
# chunks, and its reference runs through the Triton interpreter in the tests: a small one)
SHAPES = {kind: (CHUNK // 256 + 5, 256) for kind in NOISE_KINDS} | {"philox": (37, 64)}


def shards(whole: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``whole`` cut by rows into ``n`` stand-ins for FSDP2's ``Shard(0)`` locals (the last one shorter)."""
    rows = -(-whole.shape[0] // n)
    out = []
    for r in range(n):
        q = whole[r * rows:(r + 1) * rows].clone()
        q.sharded_param, q.flat_start = whole, r * rows * whole.shape[1]
        out.append(q)
    return out


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_shards_draw_and_update_the_one_process_slices(kind):
    noise, sharded = Noise(kind), ShardedNoise(Noise(kind))
    whole = torch.randn(*SHAPES[kind], generator=torch.Generator().manual_seed(1))
    seed = 12345
    z = noise.draw(whole, seed)
    updated = whole.clone()
    noise.update_(updated, seed, restore=1e-3, decay=0.99, alpha=-0.5)
    rows = -(-whole.shape[0] // 2)
    for r, q in enumerate(shards(whole, 2)):
        part = slice(r * rows, (r + 1) * rows)
        assert torch.equal(sharded.draw(q, seed), z[part])
        assert torch.equal(sharded.view(q, seed), z[part])
        sharded.update_(q, seed, restore=1e-3, decay=0.99, alpha=-0.5)
        torch.testing.assert_close(q, updated[part], rtol=0, atol=1e-6)  # the same operations per element
    plain = whole.clone()  # a tensor that is not a shard: the noise itself
    sharded.add_(plain, seed, 2.0)
    torch.testing.assert_close(plain, whole + 2.0 * z, rtol=0, atol=1e-6)
