"""First-order offload (Fuyou, arXiv 2403.06504) == in-memory layer-wise training, bit for bit in fp32 on CPU."""

import time

import pytest
import torch

import lowmem.offload.fo_host as fo_host
from lowmem.memory import state_bytes
from lowmem.offload.firstorder import FirstOrderEngine
from lowmem.optim import create_optimizer
from lowmem.steps.layerwise import LayerwiseOptimizer
from tests.offload.fo_helpers import (assert_same_state, eng_step, engine, optimizer, ref_step, reference,
                                      state_of)
from tests.offload.helpers import assert_same_weights, batches

TIERS = {"host": lambda tmp: {}, "nvme": lambda tmp: dict(nvme_dir=str(tmp), host_memory_budget_gb=0.0)}


def _run_both(tiny_model, name, config, steps=3, **model_kw):
    ref, ref_opt = reference(tiny_model, name, **model_kw)
    _, eng = engine(tiny_model, name, config, **model_kw)
    for k, batch in enumerate(batches(steps)):
        expected, got = ref_step(ref, ref_opt, batch), eng_step(eng, batch)
        assert torch.equal(expected, got), f"step {k}: loss {got.item()} != {expected.item()}"
    return ref, ref_opt, eng


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tier", list(TIERS))
@pytest.mark.parametrize("name", ["adamw", "apollo_mini", "adamw8bit"])
def test_bit_identical_to_layerwise(tiny_model, tmp_path, name, tier, tied, request):
    if name == "adamw8bit" and (tier, tied) == ("host", False):
        # Triton's CPU interpreter (the kernel run on packed master views) in the host-untied case only; the
        # other tier and tying cases test the schedule, on the C kernels (about a third of the CPU time)
        request.getfixturevalue("triton_interpreter")
    ref, ref_opt, eng = _run_both(tiny_model, name, TIERS[tier](tmp_path), layers=3, tied=tied)
    assert_same_weights(eng.model_state_dict(), ref)
    assert_same_state(state_of(ref_opt), eng.state_dict()["optimizer"]["state"])
    block_params = [p for pk in eng.packed for p in pk.params]
    if tier == "nvme":  # masters and states in files; no block state left in memory between steps
        assert set(eng.store.tiers) == {"nvme"} and set(eng.states.tiers.values()) == {"nvme"}
        assert len(list(tmp_path.glob("state_*.lmz"))) == len(eng.packed)
        assert state_bytes(eng.optimizer, block_params) == 0
    else:
        assert state_bytes(eng.optimizer, block_params) > 0
    batch = batches(1, seed=9)[0]
    assert torch.equal(eng.eval_loss(batch), ref(**batch).loss)


def test_mixed_tiers_deeper_prefetch(tiny_model, tmp_path):
    """Some masters on the host, the rest and the states over budget on NVMe; prefetch 2."""
    config = dict(nvme_dir=str(tmp_path), host_memory_budget_gb=1e-4, prefetch_depth=2)
    ref, ref_opt, eng = _run_both(tiny_model, "adamw", config, layers=4)
    assert "host" in eng.store.tiers and "nvme" in eng.store.tiers
    assert "nvme" in eng.states.tiers.values()
    assert len(eng.mover.slots) == 3  # at most prefetch_depth + 1 block copies on the device
    assert_same_weights(eng.model_state_dict(), ref)
    assert_same_state(state_of(ref_opt), eng.state_dict()["optimizer"]["state"])


def test_dropout_replayed_in_recompute(tiny_model):
    """Dropout > 0: the recompute replays the forward's RNG, so gradients are the in-memory ones."""
    def with_dropout(**kw):
        model = tiny_model(**kw)
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.3
        return model

    torch.manual_seed(1)
    ref, ref_opt = reference(with_dropout, "adamw", layers=3)
    _, eng = engine(with_dropout, "adamw", layers=3)
    for batch in batches(3):
        torch.manual_seed(11)
        expected = ref_step(ref, ref_opt, batch)
        torch.manual_seed(11)
        assert torch.equal(eng_step(eng, batch), expected)
    assert_same_weights(eng.model_state_dict(), ref)


def test_slow_cpu_step_changes_nothing(tiny_model, tmp_path, monkeypatch):
    """The barrier holds: a CPU step delayed past the backward still precedes the next forward."""
    real = fo_host.step_one

    def slow(opt, group, p):
        time.sleep(0.002)
        real(opt, group, p)

    monkeypatch.setattr(fo_host, "step_one", slow)
    ref, _, eng = _run_both(tiny_model, "adamw", TIERS["nvme"](tmp_path), layers=3)
    assert_same_weights(eng.model_state_dict(), ref)


def test_resume_through_the_engine(tiny_model, tmp_path, monkeypatch):
    # the PyTorch kernels, not Triton's CPU interpreter (2-3x the CPU time): engine and reference take the
    # same path either way; test_bit_identical_to_layerwise[adamw8bit-host-untied] keeps the interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    data = batches(4)
    _, straight = engine(tiny_model, "adamw8bit", TIERS["nvme"](tmp_path / "a"), layers=3, tied=True)
    losses = [eng_step(straight, b) for b in data]

    _, first = engine(tiny_model, "adamw8bit", layers=3, tied=True)
    for b in data[:2]:
        eng_step(first, b)
    saved = {"weights": first.model_state_dict(), "engine": first.state_dict()}
    first.close()
    _, second = engine(tiny_model, "adamw8bit", TIERS["nvme"](tmp_path / "b"), layers=3, tied=True, seed=5)
    second.load_model_state_dict(saved["weights"])
    second.load_state_dict(saved["engine"])
    assert second.steps == 2 and set(second.states.tiers.values()) == {"nvme"}
    for b, expected in zip(data[2:], losses[2:]):
        assert torch.equal(eng_step(second, b), expected)
    assert_same_weights(second.model_state_dict(), straight.model_state_dict())
    assert_same_state(straight.state_dict()["optimizer"]["state"], second.state_dict()["optimizer"]["state"])


@pytest.mark.parametrize("what", ["state", "block"])
def test_damaged_file_one_line_naming_it(tiny_model, tmp_path, what):
    _, eng = engine(tiny_model, "adamw", TIERS["nvme"](tmp_path), layers=3)
    eng_step(eng, batches(1)[0])
    path = eng.states.path(1) if what == "state" else eng.store.path(1)
    raw = bytearray(path.read_bytes())
    if what == "state":
        raw[4096 + 7] ^= 0x01
        message = f"^{path}: checksum mismatch$"
    else:
        raw = raw[:-16]
        message = f"^{path}: truncated or wrong size"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=message) as err:
        eng_step(eng, batches(1, seed=3)[0])
    assert "\n" not in str(err.value)


def test_refusals(tiny_model):
    model = tiny_model(layers=2)
    with pytest.raises(ValueError, match="^optim.name: a zeroth-order"):
        FirstOrderEngine(model, create_optimizer(model, "mezo", lr=1e-3), device="cpu")
    with pytest.raises(ValueError, match="^optim.layerwise: "):
        FirstOrderEngine(model, LayerwiseOptimizer(optimizer(model, "adamw")), device="cpu")
    with pytest.raises(ValueError, match="^offload.host_memory_budget_gb: .*nvme_dir is not set"):
        FirstOrderEngine(model, optimizer(model, "adamw"), dict(host_memory_budget_gb=0.0), device="cpu")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="^model: every block parameter must be trainable"):
        FirstOrderEngine(model, optimizer(model, "adamw"), device="cpu")


def test_nonfinite_gradient_is_dropped_and_reported(tiny_model):
    _, eng = engine(tiny_model, "adamw", layers=2)
    before = eng.model_state_dict()
    w = eng.model.lm_head.weight
    hook = w.register_hook(lambda g: torch.full_like(g, float("nan")))
    loss, nonfinite = eng.step(lambda: eng.model(**batches(1)[0]).loss)
    hook.remove()
    after = eng.model_state_dict()
    assert nonfinite and torch.isfinite(loss)
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])       # dropped, as layer-wise
    assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # the rest stepped


@pytest.mark.parametrize("override, field", [("optim.max_grad_norm=1.0", "optim.max_grad_norm"),
                                             ("train.mixed_precision=fp16", "train.mixed_precision"),
                                             ("offload.host_dtype=bfloat16", "offload.host_dtype")])
def test_recipe_refuses_what_layerwise_cannot_do(override, field):
    from pathlib import Path

    from lowmem.recipe import RecipeError, load_recipe

    path = Path(__file__).resolve().parents[2] / "recipes" / "fuyou-nvme-cpu.yaml"
    assert load_recipe(path).offload.enabled
    with pytest.raises(RecipeError, match=f"{field}: .*first-order offload engine") as err:
        load_recipe(path, [override])
    assert "\n" not in str(err.value)
    load_recipe(path, [override, "optim.name=mezo", "optim.args={eps: 0.001}", 'train.mixed_precision="no"',
                       "optim.max_grad_norm=null"])  # ZO2 takes the same section
