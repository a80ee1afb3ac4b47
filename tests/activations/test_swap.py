"""apply_wta_crs / remove_wta_crs on Llama, GPT-2 and OPT: the default target rule, exact
reproduction at keep_ratio 1, remove, seeded determinism and resume, saved bytes, errors."""

import pytest
import torch

from lowmem.activations import apply_wta_crs, remove_wta_crs, select_targets
from lowmem.memory import SavedTensorMeter
from lowmem.optim.registry import create_optimizer

EXPECTED_PER_BLOCK = {
    "llama": {"self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gpt2": {"attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "opt": {"self_attn.out_proj", "fc1", "fc2"},
}
BLOCK_PREFIX = {"llama": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers"}


def _grads(model, batch):
    torch.manual_seed(0)  # the same dropout masks in every run (WTA-CRS draws from its own generator)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_default_targets(arch, tiny_model):
    model = tiny_model(arch)
    expected = {f"{BLOCK_PREFIX[arch]}.{i}.{m}" for i in range(2) for m in EXPECTED_PER_BLOCK[arch]}
    assert set(select_targets(model)) == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_keep_ratio_one_is_bit_exact_and_remove_restores(arch, tiny_model, tiny_batch):
    model, batch = tiny_model(arch), tiny_batch(seq=64)
    keys = list(model.state_dict())
    reference = _grads(model, batch)
    handle = apply_wta_crs(model, keep_ratio=1.0)
    assert all(torch.equal(g, reference[n]) for n, g in _grads(model, batch).items())
    handle.remove()
    apply_wta_crs(model, keep_ratio=0.3)
    sampled = _grads(model, batch)
    assert not all(torch.equal(g, reference[n]) for n, g in sampled.items())
    assert remove_wta_crs(model) == len(select_targets(model))
    assert list(model.state_dict()) == keys
    assert all(torch.equal(g, reference[n]) for n, g in _grads(model, batch).items())


def test_same_seed_same_gradients_and_exact_resume(tiny_model, tiny_batch):
    batch = tiny_batch(seq=64)
    runs = []
    for _ in range(2):
        model = tiny_model("llama")
        handle = apply_wta_crs(model, keep_ratio=0.3, seed=11, grad_norm_momentum=0.9)
        runs.append([_grads(model, batch) for _ in range(2)])
    for step_a, step_b in zip(*runs):
        assert all(torch.equal(step_a[n], step_b[n]) for n in step_a)
    # resume: save the handle state after step 1, take step 2 twice
    state = handle.state_dict()
    assert any(k.startswith("grad_norm.") for k in state)
    step2 = _grads(model, batch)
    handle.load_state_dict(state)
    again = _grads(model, batch)
    assert all(torch.equal(step2[n], again[n]) for n in step2)
    handle.generator.manual_seed(12)
    assert not all(torch.equal(step2[n], g) for n, g in _grads(model, batch).items())


def test_forward_never_touches_the_global_rng(tiny_model, tiny_batch):
    model, batch = tiny_model("llama"), tiny_batch(seq=64)
    apply_wta_crs(model, keep_ratio=0.3)
    state = torch.random.get_rng_state()
    model(**batch).loss.backward()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_saved_bytes_drop_by_the_swapped_layers_share(tiny_model, tiny_batch):
    """Measured saved-for-backward bytes fall by the swapped layers' inputs (each distinct input
    tensor once: gate_proj and up_proj share theirs) minus the <= k sampled rows each layer keeps.
    Eager attention: with SDPA the o_proj input is SDPA's output, which SDPA saves anyway."""
    model, batch = tiny_model("llama", hidden=64), tiny_batch(batch=2, seq=128)
    model.set_attn_implementation("eager")
    n_rows, k = 2 * 128, int(2 * 128 * 0.3)
    targets = select_targets(model)
    distinct_inputs = sum(n_rows * m.in_features * 4 for n, m in targets.items() if not n.endswith("up_proj"))
    kept_max = sum(k * (m.in_features * 4 + 8 + 4) for m in targets.values())

    def measure():
        meter = SavedTensorMeter()
        with meter.measure():
            model(**batch).loss.backward()
        return meter.bytes

    plain = measure()
    apply_wta_crs(model, keep_ratio=0.3)
    reduction = plain - measure()
    assert distinct_inputs - kept_max <= reduction < distinct_inputs


def test_composes_with_a_first_order_optimizer(tiny_model, tiny_batch):
    """APOLLO-Mini still targets the swapped layers (they remain nn.Linear), and at keep_ratio 1
    two optimizer steps equal the run without WTA-CRS bit for bit."""
    batch = tiny_batch(seq=64)
    params = []
    for ratio in (None, 1.0):
        model = tiny_model("llama")
        if ratio is not None:
            apply_wta_crs(model, keep_ratio=ratio)
        opt = create_optimizer(model, "apollo_mini", lr=1e-2)
        targeted = {id(p) for g in opt.param_groups if "rank" in g for p in g["params"]}
        assert id(model.model.layers[0].mlp.down_proj.weight) in targeted
        for _ in range(2):
            _grads(model, batch)
            opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))


def test_gradient_checkpointing_is_refused(tiny_model, tiny_batch):
    model = tiny_model("llama")
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        apply_wta_crs(model, keep_ratio=0.3)
    model.gradient_checkpointing_disable()
    apply_wta_crs(model, keep_ratio=0.3)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        _grads(model, tiny_batch(seq=64))


@pytest.mark.parametrize("kwargs, field", [(dict(keep_ratio=0.0), "keep_ratio"), (dict(keep_ratio=1.5), "keep_ratio"),
                                           (dict(keep_ratio=0.3, minimal_k=0), "minimal_k"),
                                           (dict(keep_ratio=0.3, grad_norm_momentum=1.0), "grad_norm_momentum"),
                                           (dict(keep_ratio=0.3, targets=["*nothing*"]), "targets")])
def test_bad_arguments_name_the_field(kwargs, field, tiny_model):
    with pytest.raises(ValueError, match=rf"^activations\.wta_crs\.{field}: "):
        apply_wta_crs(tiny_model("llama"), **kwargs)


def test_applying_twice_is_refused(tiny_model):
    model = tiny_model("llama")
    apply_wta_crs(model, keep_ratio=0.3)
    with pytest.raises(ValueError, match="already applied"):
        apply_wta_crs(model, keep_ratio=0.3)
