"""Lean RMSNorm and gated MLP: the module's forward bit for bit, its gradients to rounding, the
saved bytes the docstring promises, the shared WTA-CRS sample unbiased, swap and remove."""

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from lowmem.activations import apply_wta_crs
from lowmem.activations.lean import apply_lean, remove_lean
from lowmem.memory import SavedTensorMeter


def _llama_parts(dtype=torch.float64, bias=False, act="silu", d=16, f=40):
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
    from transformers import LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=d, intermediate_size=f, mlp_bias=bias, hidden_act=act, num_attention_heads=4)
    mlp, norm = LlamaMLP(cfg).to(dtype), LlamaRMSNorm(d, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return mlp, norm


def _forward_backward(module, x, grad):
    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("part", ["norm", "mlp", "mlp_bias", "mlp_gelu"])
def test_forward_bit_exact_and_gradients_equal_autograd(part):
    mlp, norm = _llama_parts(bias=part == "mlp_bias", act="gelu_pytorch_tanh" if part == "mlp_gelu" else "silu")
    module = norm if part == "norm" else mlp
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    grad = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    y_ref, gx_ref, gw_ref = _forward_backward(module, x, grad)
    handle = apply_lean(module)
    assert list(handle.modules) == [""]
    y, gx, gw = _forward_backward(module, x, grad)
    assert torch.equal(y, y_ref)
    tol = dict(rtol=1e-5, atol=1e-6) if part == "norm" else dict(rtol=1e-12, atol=1e-12)  # the norm computes in fp32
    torch.testing.assert_close(gx, gx_ref, **tol)
    for name, g in gw.items():
        torch.testing.assert_close(g, gw_ref[name], **tol)
    handle.remove()
    assert type(module).__name__ in ("LlamaMLP", "LlamaRMSNorm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_and_autocast_match_the_plain_modules(dtype):
    mlp, norm = _llama_parts(dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 16, generator=gen).to(dtype)
    grad = torch.randn(2, 5, 16, generator=gen).to(dtype)
    for module in (norm, mlp):
        ref = _forward_backward(module, x, grad)
        handle = apply_lean(module)
        out = _forward_backward(module, x, grad)
        handle.remove()
        assert torch.equal(out[0], ref[0])
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out[1], ref[1], **tol)
        for name, g in out[2].items():
            torch.testing.assert_close(g, ref[2][name], **tol)
    # bf16 autocast over fp32 weights: the MLP's matmuls and element-wise ops run in bf16 in both
    mlp, _ = _llama_parts(dtype=torch.float32)
    x32, g32 = x.float(), grad.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _forward_backward(mlp, x32, g32)
        apply_lean(mlp)
        out = _forward_backward(mlp, x32, g32)
    assert out[0].dtype == torch.bfloat16 and torch.equal(out[0], ref[0])
    for name, g in out[2].items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, ref[2][name], rtol=2e-2, atol=2e-2)


def _saved_bytes(module, x):
    meter = SavedTensorMeter()
    with meter.measure():
        module(x.detach().requires_grad_(True)).sum()
    return meter.bytes


def test_saved_bytes_are_the_inputs_only():
    d, f, rows = 64, 160, 2 * 128
    mlp, norm = _llama_parts(dtype=torch.float32, d=d, f=f)
    x = torch.randn(2, 128, d)
    weights = {m: sum(p.numel() * 4 for p in m.parameters()) for m in (mlp, norm)}
    plain = {m: _saved_bytes(m, x) - weights[m] for m in (mlp, norm)}
    assert plain[mlp] == rows * (d + 4 * f) * 4  # x, g, act(g), u, act(g)*u
    assert plain[norm] == rows * (2 * d + 1) * 4  # x, r, x̂ (fp32 input: no copy)
    apply_lean(mlp), apply_lean(norm)
    assert _saved_bytes(mlp, x) - weights[mlp] == rows * (d + 2 * f) * 4  # x, g, u
    assert _saved_bytes(norm, x) - weights[norm] == rows * (d + 1) * 4  # x, r


def test_shared_wta_crs_sample_is_unbiased_and_exact_elsewhere():
    """gate_proj and up_proj under WTA-CRS: one row sample for both weight gradients. Over many
    samples their mean approaches the exact gradient; ∂x, ∂W_down and the loss are exact each time."""
    mlp, _ = _llama_parts(dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, 16, generator=gen, dtype=torch.float64) * torch.rand(4, 32, 1, generator=gen,
                                                                                   dtype=torch.float64)
    grad = torch.randn(4, 32, 16, generator=gen, dtype=torch.float64)
    y_ref, gx_ref, gw_ref = _forward_backward(mlp, x, grad)
    apply_wta_crs(mlp, keep_ratio=0.25, targets=["gate_proj", "up_proj"], seed=5, minimal_k=1)
    apply_lean(mlp)
    meter = SavedTensorMeter()
    with meter.measure():
        mlp(x.detach().requires_grad_(True))
    weights = sum(p.numel() * 8 for p in mlp.parameters())
    rows = 4 * 32
    kept_rows = (meter.bytes - weights - rows * 2 * 40 * 8) / (16 * 8 + 8 + 4)  # x row + index + weight
    assert kept_rows <= rows * 0.25
    draws = {"gate_proj.weight": [], "up_proj.weight": []}
    for _ in range(400):
        y, gx, gw = _forward_backward(mlp, x, grad)
        assert torch.equal(y, y_ref)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gw["down_proj.weight"], gw_ref["down_proj.weight"], rtol=1e-12, atol=1e-12)
        for name in draws:
            draws[name].append(gw[name])
    for name, samples in draws.items():
        stack = torch.stack(samples)
        sem = stack.std(0) / len(samples) ** 0.5
        z = (stack.mean(0) - gw_ref[name]).abs() / sem.clamp_min(1e-12)
        assert not torch.equal(samples[0], gw_ref[name])
        assert (z < 4.5).all(), f"{name}: max z {z.max():.2f}"


def test_keep_ratio_one_is_the_lean_exact_path():
    mlp, _ = _llama_parts(dtype=torch.float64)
    x, grad = torch.randn(2, 8, 16, dtype=torch.float64), torch.randn(2, 8, 16, dtype=torch.float64)
    apply_lean(mlp)
    exact = _forward_backward(mlp, x, grad)
    apply_wta_crs(mlp, keep_ratio=1.0, targets=["gate_proj", "up_proj", "down_proj"])
    again = _forward_backward(mlp, x, grad)
    assert all(torch.equal(again[2][n], g) for n, g in exact[2].items()) and torch.equal(again[1], exact[1])


def test_whole_model_swap_remove_and_no_grad(tiny_model, tiny_batch):
    model, batch = tiny_model("llama"), tiny_batch(seq=32)
    keys = list(model.state_dict())
    loss_ref = model(**batch).loss
    loss_ref.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    handle = apply_lean(model)
    assert {n.rsplit(".", 1)[-1] for n in handle.modules} == {"mlp", "input_layernorm", "post_attention_layernorm",
                                                              "norm"}
    loss = model(**batch).loss
    assert torch.equal(loss, loss_ref)
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the original forward
        assert torch.equal(model(**batch).loss, loss_ref.detach())
    with pytest.raises(ValueError, match="activations.lean: already applied"):
        apply_lean(model)
    assert remove_lean(model) == len(handle.modules)
    assert list(model.state_dict()) == keys and not any("Lean" in type(m).__name__ for m in model.modules())


def test_gradient_checkpointing_composes(tiny_model, tiny_batch):
    model, batch = tiny_model("llama"), tiny_batch(seq=32)
    model(**batch).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    apply_lean(model)
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-5, atol=1e-6)


def test_variants_that_compute_otherwise_are_left_alone(tiny_model):
    class GemmaLikeRMSNorm(nn.Module):  # y = (1 + w) x̂: not the Llama formula
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(8)), 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    class SwappedMLP(nn.Module):  # act(up) * gate
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
            self.act_fn = ACT2FN["silu"]

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    with pytest.raises(ValueError, match="activations.lean: .* has no RMSNorm or gated MLP"):
        apply_lean(nn.Sequential(GemmaLikeRMSNorm(), SwappedMLP()))
    with pytest.raises(ValueError, match="activations.lean: GPT2LMHeadModel"):
        apply_lean(tiny_model("gpt2"))


def test_norm_variants_that_differ_only_in_low_precision_are_left_alone():
    """Olmo-2 style: (w ⊙ x̂) cast after the product. Equal to Llama's in fp32, not in bf16."""
    class CastAfterRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.ones(8)), 1e-6

        def forward(self, x):
            xf = x.float()
            x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (self.weight * x_hat).to(x.dtype)

    with pytest.raises(ValueError, match="has no RMSNorm"):
        apply_lean(nn.Sequential(CastAfterRMSNorm()))


def test_fp32_norm_weights_with_bf16_input_match():
    _, norm = _llama_parts(dtype=torch.float32)
    x, grad = torch.randn(2, 5, 16).bfloat16(), torch.randn(2, 5, 16)
    ref = _forward_backward(norm, x, grad)
    apply_lean(norm)
    out = _forward_backward(norm, x, grad)
    assert out[0].dtype == ref[0].dtype == torch.float32 and torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[2]["weight"], ref[2]["weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1].float(), ref[1].float(), rtol=2e-2, atol=2e-2)


def test_remove_twice_pickle_and_a_later_lora_wrapper(tiny_model, tiny_batch):
    import pickle

    from peft import LoraConfig, get_peft_model

    model, batch = tiny_model("llama"), tiny_batch(seq=16)
    handle = apply_lean(model)
    clone = pickle.loads(pickle.dumps(model.model.layers[0].mlp))  # pickles as the original class
    assert type(clone).__name__ == "LlamaMLP"
    assert remove_lean(model) == len(handle.modules)
    handle.remove()  # already restored: nothing to do
    apply_lean(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]))
    loss = peft_model(**batch).loss
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).loss, loss.detach())  # the LoRA path runs in training too
    loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)


def test_identity_activation_keeps_g_intact_for_a_second_backward():
    mlp, _ = _llama_parts(dtype=torch.float64, act="linear")
    apply_lean(mlp)
    x = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    y = mlp(x).square().sum()
    first, = torch.autograd.grad(y, x, retain_graph=True)
    second, = torch.autograd.grad(y, x)
    assert torch.equal(first, second)
