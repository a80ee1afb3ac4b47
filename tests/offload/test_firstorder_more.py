"""First-order offload (Fuyou, arXiv 2403.06504): gradient accumulation, activation swapping and
offloaded embeddings each leave training bit-identical to in-memory layer-wise training (fp32, CPU)."""

import pytest
import torch

from lowmem.memory import state_bytes
from lowmem.offload.fo_swap import Profile, swap_count
from lowmem.steps.layerwise import LayerwiseOptimizer
from tests.offload.fo_helpers import assert_same_state, engine, optimizer, state_of
from tests.offload.helpers import assert_same_weights, batches

NVME = lambda tmp: dict(nvme_dir=str(tmp), host_memory_budget_gb=0.0)  # noqa: E731


def _reference_accum(tiny_model, name, accum, **model_kw):
    model = tiny_model(**model_kw).train()
    return model, LayerwiseOptimizer(optimizer(model, name), grad_accum_steps=accum)


def _ref_step(model, opt, micro) -> float:
    """The trainer's layer-wise step: each micro-batch's loss / A backpropagated, then step()."""
    total = 0.0
    for batch in micro:
        loss = model(**batch).loss
        (loss / len(micro)).backward()
        total += loss.item() / len(micro)
    opt.step()
    opt.zero_grad()
    return total


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name, tier", [("adamw", "host"), ("apollo_mini", "nvme"), ("adamw8bit", "host")])
def test_grad_accum_equals_layerwise_accumulation(tiny_model, tmp_path, name, tier, tied, monkeypatch):
    # the PyTorch kernels, not Triton's CPU interpreter (2-3x the CPU time): engine and reference take the
    # same path either way; test_bit_identical_to_layerwise[adamw8bit-host-untied] keeps the interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    accum = 3
    ref, ref_opt = _reference_accum(tiny_model, name, accum, layers=3, tied=tied)
    _, eng = engine(tiny_model, name, NVME(tmp_path) if tier == "nvme" else {}, layers=3, tied=tied)
    data = batches(3 * accum)
    for s in range(3):
        micro = data[s * accum:(s + 1) * accum]
        expected = _ref_step(ref, ref_opt, micro)
        loss, nonfinite = eng.step([lambda b=b: eng.model(**b).loss for b in micro])
        assert not nonfinite and float(loss) == expected
    assert_same_weights(eng.model_state_dict(), ref)
    assert_same_state(state_of(ref_opt), eng.state_dict()["optimizer"]["state"])
    assert not eng.host.accum  # nothing held across steps


def test_accumulated_nonfinite_gradient_dropped_as_layerwise(tiny_model):
    """A NaN in micro-batch 1 of 2 drops that parameter's sum so far; micro-batch 2 alone steps it."""
    ref, ref_opt = _reference_accum(tiny_model, "adamw", 2, layers=2)
    _, eng = engine(tiny_model, "adamw", layers=2)
    micro = batches(2)
    calls = {"ref": 0, "eng": 0}

    def poison(key):
        def hook(g):
            calls[key] += 1
            return torch.full_like(g, float("nan")) if calls[key] == 1 else g
        return hook

    handles = [ref.model.layers[1].mlp.down_proj.weight.register_hook(poison("ref"))]
    _ref_step(ref, ref_opt, micro)
    assert ref_opt.take_nonfinite()
    handles.append(eng.model.model.layers[1].mlp.down_proj.weight.register_hook(poison("eng")))
    _, nonfinite = eng.step([lambda b=b: eng.model(**b).loss for b in micro])
    for h in handles:
        h.remove()
    assert nonfinite and calls["eng"] == 2
    assert_same_weights(eng.model_state_dict(), ref)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_activation_swap_forced_on_or_off_is_bit_identical(tiny_model, tied, monkeypatch):
    import lowmem.offload.fo_driver as fo_driver

    swapped = []
    real = fo_driver.BlockDriver._swap_out

    def spy(self, k, x):
        real(self, k, x)
        swapped.append((k, x.numel()))  # the device copy is released: an empty tensor now

    monkeypatch.setattr(fo_driver.BlockDriver, "_swap_out", spy)
    runs = {}
    for mode in ("off", "on"):
        _, eng = engine(tiny_model, "adamw", dict(swap_activations=mode, prefetch_depth=2), layers=4, tied=tied)
        runs[mode] = [eng.step(lambda b=b: eng.model(**b).loss)[0] for b in batches(3)], eng.model_state_dict()
        assert not eng.driver.swapped  # every swapped activation came back
        eng.close()
    assert sorted(swapped) == sorted((k, 0) for _ in range(3) for k in (1, 2, 3))  # x_1..x_{N-1} per step
    assert all(torch.equal(a, b) for a, b in zip(runs["off"][0], runs["on"][0]))
    assert_same_weights(runs["on"][1], runs["off"][1])


def test_swap_rule_from_measurements():
    fast = Profile(boundary_bytes=1 << 20, block_s=1e-3, down_bps=20e9, up_bps=20e9, device_peak=10 << 30)
    slow = Profile(boundary_bytes=1 << 20, block_s=1e-5, down_bps=20e9, up_bps=20e9, device_peak=10 << 30)
    assert swap_count("on", 8, None, "cpu", None) == 7 and swap_count("off", 8, fast, "cuda", None) == 0
    assert swap_count("auto", 8, None, "cuda", None) == 0          # the profile step swaps nothing
    assert swap_count("auto", 8, fast, "cpu", None) == 0           # a CPU "device" frees nothing by swapping
    assert swap_count("auto", 8, fast, "cuda", None) == 7          # the round trip hides behind a block
    assert swap_count("auto", 8, slow, "cuda", None) == 0          # it would not: keep them
    assert swap_count("auto", 8, slow, "cuda", (10 << 30) - (3 << 20) + 1) == 3   # the budget needs 3
    assert swap_count("auto", 8, slow, "cuda", 1.0) == 7           # at most N - 1


def test_auto_swap_profiles_the_first_step(tiny_model):
    _, eng = engine(tiny_model, "adamw", layers=3)
    assert eng.profile is None
    eng.step(lambda: eng.model(**batches(1)[0]).loss)
    p = eng.profile
    assert p.boundary_bytes == 2 * 12 * 32 * 4 and p.block_s > 0 and p.down_bps > 0 and p.device_peak is None
    assert eng.driver.swap == 0 and eng.driver.last_boundary is None


@pytest.mark.parametrize("name, tier, tied", [("adamw", "host", False), ("adamw", "host", True),
                                              ("adamw", "nvme", False), ("adamw", "nvme", True),
                                              ("apollo_mini", "nvme", True)])
def test_offloaded_embeddings_equal_layerwise(tiny_model, tmp_path, name, tier, tied):
    # vocab 1024: AdamW steps the 1024 x 32 embedding (and lm_head) in 4 row chunks of at most a block (9280
    # elements); APOLLO-Mini (not elementwise by rows) steps each whole
    config = {**(NVME(tmp_path) if tier == "nvme" else {}), "offload_embeddings": "on"}
    model = tiny_model(layers=3, tied=tied, vocab=1024).train()
    ref_opt = LayerwiseOptimizer(optimizer(model, name))
    _, eng = engine(tiny_model, name, config, layers=3, tied=tied, vocab=1024)
    names = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    assert {n for n, p in eng.model.named_parameters() if any(p is q for q in eng.big_params)} == names
    assert len(eng.big.chunks[0]) == (4 if name == "adamw" else 1)
    for batch in batches(3):
        loss = model(**batch).loss
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert torch.equal(eng.step(lambda b=batch: eng.model(**b).loss)[0], loss.detach())
    assert_same_weights(eng.model_state_dict(), model)
    assert_same_state(state_of(ref_opt), eng.state_dict()["optimizer"]["state"])
    if tier == "nvme":  # master and state in files; no state of them left in memory between steps
        assert set(eng.big.store.tiers) == {"nvme"} and eng.states.tiers[len(eng.packed)] == "nvme"
        assert state_bytes(eng.optimizer, eng.big_params) == 0
    batch = batches(1, seed=9)[0]
    assert torch.equal(eng.eval_loss(batch), model(**batch).loss)


def test_offload_embeddings_auto_takes_those_larger_than_a_block(tiny_model):
    _, small = engine(tiny_model, "adamw", layers=2)
    assert small.big is None  # vocab 128 x 32 < a block
    _, large = engine(tiny_model, "adamw", layers=2, vocab=4096)
    assert {n for n, p in large.model.named_parameters() if any(p is q for q in large.big_params)} == {
        "model.embed_tokens.weight", "lm_head.weight"}


def test_resume_with_offloaded_embeddings(tiny_model, tmp_path):
    # vocab 1024: the embedding's state is in 4 row chunks (files on NVMe), put together and split again
    config = {**NVME(tmp_path / "a"), "offload_embeddings": "on"}
    data = batches(4)
    _, straight = engine(tiny_model, "adamw", config, layers=2, tied=True, vocab=1024)
    losses = [straight.step(lambda b=b: straight.model(**b).loss)[0] for b in data]
    _, first = engine(tiny_model, "adamw", {"offload_embeddings": "on"}, layers=2, tied=True, vocab=1024)
    for b in data[:2]:
        first.step(lambda b=b: first.model(**b).loss)
    saved = {"weights": first.model_state_dict(), "engine": first.state_dict()}
    _, second = engine(tiny_model, "adamw", {**NVME(tmp_path / "b"), "offload_embeddings": "on"}, layers=2,
                       tied=True, seed=5, vocab=1024)
    second.load_model_state_dict(saved["weights"])
    second.load_state_dict(saved["engine"])
    for b, expected in zip(data[2:], losses[2:]):
        assert torch.equal(second.step(lambda b=b: second.model(**b).loss)[0], expected)
    assert_same_weights(second.model_state_dict(), straight.model_state_dict())
