"""ZO2 engine == in-memory MeZO (lowmem.optim.mezo), bit for bit in fp32 on CPU (ZO2, Wang et al. 2025,
arXiv 2503.12668: the offloaded run must equal standard ZO)."""

import pytest
import torch

from lowmem.offload.engine import ZO2Engine
from lowmem.optim import create_optimizer
from tests.offload.helpers import assert_same_weights, batches, engine, ref_step, reference

MODELS = [dict(arch="llama", tied=False, layers=4), dict(arch="llama", tied=True, layers=3),
          dict(arch="opt", tied=True, layers=3), dict(arch="gpt2", tied=True, layers=3)]
TIERS = {"host": lambda tmp: {}, "nvme": lambda tmp: dict(nvme_dir=str(tmp), host_memory_budget_gb=0.0),
         "mixed-depth2": lambda tmp: dict(nvme_dir=str(tmp), host_memory_budget_gb=5e-5, prefetch_depth=2)}


@pytest.mark.parametrize("model_kw", MODELS, ids=lambda kw: f"{kw['arch']}-tied{kw['tied']}")
@pytest.mark.parametrize("tier", list(TIERS))
def test_bit_identical_to_mezo(tiny_model, tmp_path, model_kw, tier):
    ref, ref_opt = reference(tiny_model, **model_kw)
    _, eng = engine(tiny_model, TIERS[tier](tmp_path), **model_kw)
    if tier == "mixed-depth2":
        assert "host" in eng.store.tiers and "nvme" in eng.store.tiers
    for k, batch in enumerate(batches(4)):
        expected, got = ref_step(ref, ref_opt, batch), eng.step(batch)
        assert torch.equal(expected, got), f"step {k}: loss {got.item()} != {expected.item()}"
        assert eng.optimizer.last_projected_grads == ref_opt.last_projected_grads
    assert eng.pending is not None  # the last update is still deferred ...
    eng.flush()                     # ... until flushed
    assert_same_weights(eng.model_state_dict(), ref)
    assert torch.equal(eng.eval_loss(batches(1, seed=9)[0]), ref(**batches(1, seed=9)[0]).loss)


def test_flush_mid_run_changes_nothing(tiny_model):
    ref, ref_opt = reference(tiny_model, arch="llama", layers=3)
    _, eng = engine(tiny_model, arch="llama", layers=3)
    for k, batch in enumerate(batches(4)):
        if k == 2:
            eng.flush()
        assert torch.equal(ref_step(ref, ref_opt, batch), eng.step(batch))
    eng.close()  # flush + blocks back into the model
    assert_same_weights(eng.model.state_dict(), ref)
    batch = batches(1, seed=5)[0]
    assert torch.equal(eng.model.eval()(**batch).loss, ref(**batch).loss)


def test_lr_of_a_step_is_used_by_its_deferred_update(tiny_model):
    """ZO2's reference applies step t's update with the LR of step t+1; here each step keeps its own."""
    ref, ref_opt = reference(tiny_model, arch="llama", layers=2)
    _, eng = engine(tiny_model, arch="llama", layers=2)
    for k, batch in enumerate(batches(3)):
        assert torch.equal(ref_step(ref, ref_opt, batch), eng.step(batch))
        for opt in (ref_opt, eng.optimizer):
            for group in opt.param_groups:
                group["lr"] *= 0.5 if k == 0 else 3.0
    eng.flush()
    assert_same_weights(eng.model_state_dict(), ref)


@pytest.mark.parametrize("flush_before_save", [False, True])
def test_resume_through_state_dict(tiny_model, tmp_path, flush_before_save):
    data = batches(4)
    _, straight = engine(tiny_model, dict(nvme_dir=str(tmp_path / "a"), host_memory_budget_gb=0.0), arch="opt",
                         tied=True, layers=3)
    losses = [straight.step(b) for b in data]
    straight.flush()

    _, first = engine(tiny_model, arch="opt", tied=True, layers=3)
    for b in data[:2]:
        first.step(b)
    if flush_before_save:
        first.flush()
    saved = {"weights": first.model_state_dict(), "engine": first.state_dict()}
    assert (saved["engine"]["pending"] is None) == flush_before_save

    _, second = engine(tiny_model, dict(nvme_dir=str(tmp_path / "b"), host_memory_budget_gb=0.0), arch="opt",
                       tied=True, layers=3, seed=123)  # other initial weights: all must come from the checkpoint
    second.load_model_state_dict(saved["weights"])
    second.load_state_dict(saved["engine"])
    for b, expected in zip(data[2:], losses[2:]):
        assert torch.equal(second.step(b), expected)
    second.flush()
    assert_same_weights(second.model_state_dict(), straight.model_state_dict())


def test_plain_forward_streams_blocks_and_applies_pending(tiny_model):
    ref, ref_opt = reference(tiny_model, arch="gpt2", tied=True, layers=2)
    model, eng = engine(tiny_model, arch="gpt2", tied=True, layers=2)
    batch = batches(1)[0]
    ref_step(ref, ref_opt, batch)
    eng.step(batch)
    with torch.no_grad():  # the trainer calling the model directly, e.g. for generation
        got = model.eval()(**batch).logits
    assert eng.pending["done"] == {0, 1}
    assert torch.equal(got, ref(**batch).logits)


@pytest.mark.parametrize("field,value,message", [
    ("host_dtype", "int4", "offload.host_dtype"),
    ("prefetch_depth", 0, "offload.prefetch_depth"),
    ("host_memory_budget_gb", -1.0, "offload.host_memory_budget_gb"),
    ("host_memory_budget_gb", 0.0, "offload.nvme_dir is not set"),
])
def test_bad_config(tiny_model, field, value, message):
    with pytest.raises(ValueError, match=message):
        engine(tiny_model, {field: value})


def test_refuses_unsupported_optimizer(tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match="optim.args"):
        ZO2Engine(model, create_optimizer(model, "mezo", momentum=0.9), device="cpu")
    with pytest.raises(ValueError, match="optim.name"):
        ZO2Engine(model, create_optimizer(model, "adamw"), device="cpu")


def test_recipe_checks_the_host_dtype_against_the_training_dtype():
    """The one place the host dtype is checked (the engines take the recipe's section as it is)."""
    from pathlib import Path

    from lowmem.recipe import RecipeError, load_recipe

    path = Path(__file__).resolve().parents[2] / "recipes" / "zo2-nvme-cpu.yaml"
    assert load_recipe(path, ["model.dtype=float32", "offload.host_dtype=bfloat16"]).offload.host_dtype == "bfloat16"
    with pytest.raises(RecipeError, match="offload.host_dtype: float32 is not coarser than the training dtype"):
        load_recipe(path, ["model.dtype=bfloat16", "offload.host_dtype=float32"])
