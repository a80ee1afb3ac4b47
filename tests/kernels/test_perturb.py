"""The counter-based perturbation (lowmem.kernels.perturb, issue #17): the reference's Philox4x32-10 against
Random123's known answers, the Triton kernel (interpreted on CPU) against the reference -- integers bit for
bit, normals to fp32 rounding --, the distribution, and the in-place modes."""

import math

import pytest
import torch

from lowmem.kernels import perturb as P

pytest.importorskip("triton")
from lowmem.kernels.perturb_triton import perturb_triton, philox_words_triton  # noqa: E402

SEEDS = [0, 1, 12345, (1 << 32) + 7, (1 << 62) + 987654321, (1 << 63) - 1]
SIZES = [1, 4097, 3 * P.TILE + 77]


@pytest.mark.parametrize("counter,key,expected", [  # Random123 1.14, kat_vectors: philox4x32 10 rounds
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))])
def test_reference_philox_matches_random123_known_answers(counter, key, expected):
    words = P.philox_rounds(*[torch.tensor([c]) for c in counter], *key)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("first", [0, (1 << 32) - 600])  # counters crossing into the high word
def test_kernel_integers_equal_the_reference_bit_for_bit(seed, first):
    n = 2 * P.LANES + 3
    got = philox_words_triton(seed, n, "cpu", first=first)
    expected = torch.stack(P.philox4x32(seed, torch.arange(first, first + n)))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("seed", SEEDS[1:4])
@pytest.mark.parametrize("n", SIZES)
def test_kernel_normals_equal_the_reference_to_fp32_rounding(seed, n):
    z = torch.empty(n)
    perturb_triton(z, seed, mode=0)
    ref = P.philox_normal(seed, 0, n)
    # the same words and uniforms; log/sqrt/cos/sin differ by a few ulp between numpy and torch
    torch.testing.assert_close(z, ref, rtol=4e-6, atol=4e-6)


@pytest.mark.parametrize("start", [5, P.TILE - 3, 2 * P.TILE + P.LANES])
def test_kernel_on_a_part_is_the_reference_at_its_positions(start):
    """A tensor holding elements [start, start + n) of a parameter (an FSDP2 shard) gets that slice of z, in
    every mode: tiles of the whole parameter's layout, masked outside the part."""
    n = P.TILE + 9
    z = torch.empty(n)
    perturb_triton(z, 31, mode=0, start=start)
    torch.testing.assert_close(z, P.philox_normal(31, start, n), rtol=4e-6, atol=4e-6)
    t, ref = torch.ones(n), torch.ones(n)
    perturb_triton(t, 31, mode=3, restore=0.5, decay=0.9, alpha=-0.25, start=start)
    P.update_ref_(ref, 31, 0.5, 0.9, -0.25, start=start)
    torch.testing.assert_close(t, ref, rtol=4e-6, atol=4e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_dtypes_round_the_fp32_normal(dtype):
    z = torch.empty(P.TILE + 5, dtype=dtype)
    perturb_triton(z, 77, mode=0)
    ref = P.philox_normal(77, 0, z.numel())
    assert (z.float() - ref).abs().max() <= torch.finfo(dtype).eps * ref.abs().max()


def test_layout_tiles_of_four_runs_of_lanes():
    """Element t*TILE + k*LANES + j is normal k of counter t*LANES + j (Box-Muller of the word pairs)."""
    seed, t, k, j = 99, 2, 3, 17
    words = P.philox4x32(seed, torch.tensor([t * P.LANES + j]))
    u = [P.uniform(w) for w in words]
    n = [*P.box_muller(u[0], u[1]), *P.box_muller(u[2], u[3])]
    e = t * P.TILE + k * P.LANES + j
    whole = P.philox_normal(seed, 0, 3 * P.TILE)
    assert torch.equal(whole[e:e + 1], n[k])
    assert torch.equal(P.philox_normal(seed, e - 5, 1000), whole[e - 5:e + 995])  # any window, same values


def test_reference_moments_and_independence_over_1m_draws():
    z = P.philox_normal(2024, 0, 1 << 20).double()
    se = 1 / 2**10
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96) * se
    c = z.view(-1, 4, P.LANES)  # the four normals of a counter (two Box-Muller pairs) are uncorrelated
    for a, b in [(0, 1), (0, 2), (2, 3)]:
        assert abs((c[:, a] * c[:, b]).mean().item()) < 5 * 2 * se
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 * se
    other = P.philox_normal(2025, 0, 1 << 20).double()  # neighbouring seeds: independent streams
    assert abs((z * other).mean().item()) < 5 * se


def _params(n=3 * P.TILE + 77, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_kernel_add_and_update_equal_the_reference_to_rounding():
    p0, seed = _params(), 31
    for mode, kw in [(1, dict(alpha=1e-3)), (2, dict(decay=0.999, alpha=-0.25)),
                     (3, dict(restore=1e-3, decay=0.999, alpha=-0.25))]:
        got, ref = p0.clone(), p0.clone()
        perturb_triton(got, seed, mode=mode, **kw)
        if mode == 1:
            P.add_ref_(ref, seed, **kw)
        else:
            P.update_ref_(ref, seed, kw.get("restore", 0.0), kw["decay"], kw["alpha"])
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)


def test_restoring_update_equals_an_add_then_the_update_bit_for_bit():
    """Mode 3 rounds after the restore as a separate add would: what the ZO2 engine relies on."""
    for dtype in (torch.float32, torch.bfloat16):
        p0 = _params().to(dtype)
        fused, split = p0.clone(), p0.clone()
        perturb_triton(fused, 5, mode=3, restore=1e-2, decay=0.99, alpha=-0.5)
        perturb_triton(split, 5, mode=1, alpha=1e-2)
        perturb_triton(split, 5, mode=2, decay=0.99, alpha=-0.5)
        assert torch.equal(fused, split)
        fused, split = p0.clone().float(), p0.clone().float()  # the reference too
        P.update_ref_(fused, 5, 1e-2, 0.99, -0.5)
        P.add_ref_(split, 5, 1e-2)
        P.update_ref_(split, 5, 0.0, 0.99, -0.5)
        assert torch.equal(fused, split)


def test_plus_minus_plus_returns_to_p0_within_the_rounding_bound():
    """x1 = fl(p0 + eps z), x2 = fl(x1 - 2 eps z), x3 = fl(x2 + eps z): each step errs by at most
    u |x_k| plus u |a z| if the product is rounded first (u = 2^-24), so with |x_k| <= |p0| + eps |z|
    |x3 - p0| <= u (3 |p0| + 6 eps |z|) (+ O(u^2))."""
    p0, eps, seed = _params(), 1e-2, 8
    z = P.philox_normal(seed, 0, p0.numel())
    bound = 2.0**-24 * (3 * p0.abs() + 6 * eps * z.abs()) * 1.001
    for run in (lambda p, a: perturb_triton(p, seed, mode=1, alpha=a),
                lambda p, a: P.add_ref_(p, seed, a)):
        p = p0.clone()
        for a in (eps, -2 * eps, eps):
            run(p, a)
        assert ((p - p0).abs() <= bound).all()


def test_reference_chunks_and_threads_do_not_change_z():
    from concurrent.futures import ThreadPoolExecutor

    n = 2 * P.CHUNK + 3 * P.TILE + 11
    whole = P.philox_normal(3, 0, n)
    out = torch.empty(n)
    with ThreadPoolExecutor(2) as pool:
        P.write_normal_ref_(out, 3, pool)
    assert torch.equal(out, whole)
    strided = torch.zeros(n, 2)[:, 0]  # not contiguous: the whole-tensor fallback
    P.add_(strided, 3, 1.0)
    assert torch.equal(strided, whole)


# ---- compiled on a GPU (skipped visibly without CUDA) -------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 4097, 1823 * 781])
def test_compiled_kernel_equals_the_reference_on_the_gpu(n):
    seed = (1 << 62) + n
    words = philox_words_triton(seed, -(-n // 4), "cuda", first=(1 << 32) - 100)
    ref = torch.stack(P.philox4x32(seed, torch.arange((1 << 32) - 100, (1 << 32) - 100 + words.shape[1],
                                                      device="cuda")))
    assert torch.equal(words, ref)
    z = torch.empty(n, device="cuda")
    perturb_triton(z, seed, mode=0)
    torch.testing.assert_close(z, P.philox_normal(seed, 0, n, "cuda"), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_compiled_restoring_update_equals_add_then_update(dtype):
    p0 = torch.randn(3 * P.TILE + 77, device="cuda").to(dtype)
    fused, split = p0.clone(), p0.clone()
    perturb_triton(fused, 5, mode=3, restore=1e-2, decay=0.99, alpha=-0.5)
    perturb_triton(split, 5, mode=1, alpha=1e-2)
    perturb_triton(split, 5, mode=2, decay=0.99, alpha=-0.5)
    assert torch.equal(fused, split)
