"""Trainable int8 weights (``model.dtype: int8``, lowmem.int8_weights; Q-GaLore's scheme): the stochastic
rounding is unbiased, an update far below one quantization step reaches the weight in expectation, the
layer computes what a dense Linear with the dequantized weight computes, every optimizer's own update lands
in the int8 weight (within one rounding step), and a run resumes bit for bit."""

import copy
import json

import pytest
import torch
from torch import nn

from lowmem.int8_weights import Int8Linear, Int8Updates, quantize_block_linears
from lowmem.kernels.int8_weights import dequantize_int8, quantize_int8_
from lowmem.steps.layerwise import LayerwiseOptimizer
from lowmem.optim.registry import create_optimizer

B = 256


def _quantized(w: torch.Tensor, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = torch.empty(w.shape, dtype=torch.int8), torch.empty(-(-w.numel() // B))
    quantize_int8_(q, s, w, B, gen)
    return q, s


@pytest.mark.parametrize("numel", [4097, 256])  # a partial last block; exactly one block
def test_stochastic_rounding_is_unbiased(numel):
    """Mean of N draws of Q(w + Δ) against w + Δ, per element, in units of its standard error
    (SR's variance is at most s²/4): every element within 5.5 standard errors. Round-to-nearest
    fails the same test (its bias reaches s/2 = sqrt(N) standard errors)."""
    torch.manual_seed(0)
    target = torch.randn(numel) * 0.02 + torch.randn(numel) * 1e-4  # w + Δ
    gen, n = torch.Generator().manual_seed(1), 2000
    total = torch.zeros(numel, dtype=torch.float64)
    for _ in range(n):
        q, s = _quantized(target, gen)
        total += dequantize_int8(q, s, B).double()
    scale = s.repeat_interleave(B)[:numel].double()  # the scales do not depend on the draw
    stderr = scale / 2 / n ** 0.5
    assert ((total / n - target.double()).abs() / stderr).max() < 5.5
    q, s = _quantized(target, None)
    assert ((dequantize_int8(q, s, B).double() - target.double()).abs() / stderr).max() > 10


def test_an_update_far_below_one_step_reaches_the_weight():
    """200 updates of 2% of a quantization step each: stochastic rounding moves the weights by 4 steps on
    average (a martingale: per element the noise std is at most sqrt(200)/2 steps, its mean over 4096
    elements ~0.11 steps); round-to-nearest never moves them."""
    torch.manual_seed(0)
    w0 = torch.randn(4096) * 0.02
    w0[::B] = 0.05  # each block's absmax fixed, away from the others: its scale stays put
    q, s = _quantized(w0, None)
    step = s.repeat_interleave(B)
    delta = 0.02 * step
    delta[::B] = 0
    gen = torch.Generator().manual_seed(0)
    q_sr, s_sr, q_rn, s_rn = q.clone(), s.clone(), q.clone(), s.clone()
    for _ in range(200):
        quantize_int8_(q_sr, s_sr, dequantize_int8(q_sr, s_sr, B) + delta, B, gen)
        quantize_int8_(q_rn, s_rn, dequantize_int8(q_rn, s_rn, B) + delta, B, None)
    moved = ((dequantize_int8(q_sr, s_sr, B) - dequantize_int8(q, s, B)) / step)[delta > 0]
    assert abs(moved.mean().item() - 4.0) < 0.6
    assert torch.equal(q_rn, q)


def test_layer_computes_the_dense_linear_of_its_dequantized_weight():
    torch.manual_seed(0)
    dense = nn.Linear(48, 40)  # 1920 weights: a partial last block
    layer = Int8Linear(dense)
    dense.weight.data = layer.dequantized()
    x = torch.randn(3, 5, 48, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x), dense(x2)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.weight.grad, dense.weight.grad)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)
    assert layer.weight.untyped_storage().nbytes() == 4  # the Parameter holds no copy of the weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16 == dense(x).dtype


@pytest.mark.parametrize("autocast", [False, True])
def test_model_gradient_is_the_dense_gradient_of_its_dequantized_weights(tiny_model, tiny_batch, autocast):
    """A whole int8 model (fp32 and bf16 autocast, as the trainer runs it) and a dense copy holding the
    dequantized weights: the same loss and the same gradient of every parameter, bit for bit, so the gradient
    norm an int8 run logs is the dense model's at the rounded weights. (Issue 27: the default recipe's step-1
    grad_norm, 31.2 with int8 weights against 7.5 in fp32, comes out identical, 31.2289, from a plain model
    holding the int8-rounded weights. That first batch's bf16-autocast gradient swings between ~5 and ~30 under
    any small change of rounding, fp32 weights included (attention or MLP run in fp32: 15.8, 21.7), and is
    5.3 to 5.7 in fp32 for both; its excess sits at one row's first tokens in layers 0-9.)"""
    dense = tiny_model()
    model = copy.deepcopy(dense)
    for lname, layer in quantize_block_linears(model).items():
        dense.get_submodule(lname).weight.data = layer.dequantized()
    batch = tiny_batch()
    losses = []
    for m in (dense, model):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m(**batch).loss
        loss.backward()
        losses.append(loss)
    assert torch.equal(*losses)
    for (n, p), (_, p2) in zip(dense.named_parameters(), model.named_parameters()):
        assert p2.grad.dtype == torch.float32 and torch.equal(p.grad, p2.grad), n


OPTIMS = {"apollo_mini": {}, "galore_adamw": dict(rank=4, update_proj_gap=2), "sinkgd": {},
          "adamw8bit": {}, "adamw-layerwise": {}}


@pytest.mark.parametrize("name", OPTIMS)
def test_each_optimizers_update_lands_in_the_int8_weight(tiny_model, tiny_batch, name):
    """One step of the same optimizer (whole, or layer-wise) on a dense model starting from the dequantized
    weights and on the int8 model: the other parameters match, and each int8 weight is within one (new)
    quantization step of the dense one (SR lands on a neighbour of W + Δ), with elements moved."""
    optim = name.removesuffix("-layerwise")
    dense = tiny_model()
    model = copy.deepcopy(dense)
    layers = quantize_block_linears(model)
    for lname, layer in layers.items():
        dense.get_submodule(lname).weight.data = layer.dequantized()
    before = {n: m.weight_q.clone() for n, m in layers.items()}
    opts = [create_optimizer(m, optim, lr=1e-2, **OPTIMS[name]) for m in (dense, model)]
    Int8Updates(model, opts[1], seed=0)
    if name.endswith("layerwise"):
        opts = [LayerwiseOptimizer(o) for o in opts]
    batch = tiny_batch()
    for m, opt in zip((dense, model), opts):
        m(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    for lname, layer in layers.items():
        step = layer.weight_scale.repeat_interleave(B)[:layer.weight_q.numel()].view(layer.weight_q.shape)
        assert ((layer.dequantized() - dense.get_submodule(lname).weight).abs() <= step * (1 + 1e-6)).all(), lname
        assert not torch.equal(layer.weight_q, before[lname]), lname
        assert layer.weight.untyped_storage().nbytes() == 4 and layer.weight.grad is None
    for (n, p), (n2, p2) in zip(dense.named_parameters(), model.named_parameters()):
        if n.rpartition(".")[0] not in layers:
            torch.testing.assert_close(p, p2, rtol=1e-5, atol=1e-6, msg=n)


def _records(run_dir) -> list[dict]:
    return [{k: v for k, v in json.loads(r).items() if k != "tokens_per_s"}
            for r in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_int8_run_resumes_exactly(tmp_path):
    """Layer-wise APOLLO-Mini on int8 weights, interrupted after the checkpoint at step 2 and resumed:
    logged losses, payloads, scales and the rounding generator equal the uninterrupted run's."""
    from safetensors.torch import load_file

    from lowmem.recipe import recipe_from_dict
    from lowmem.trainer import Trainer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 23}" for j in range(80)))
    tree = {"model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "vocab_size": 257}, "tokenizer": "bytes", "dtype": "int8"},
            "data": {"path": str(corpus), "eval_fraction": 0.2},
            "optim": {"name": "apollo_mini", "lr": 1e-2, "layerwise": True, "max_grad_norm": None},
            "train": {"steps": 4, "batch_size": 2, "seq_len": 32, "eval_batches": 1, "checkpoint_every": 2}}

    class Stop(Trainer):
        def train_step(self):
            if self.step == 3:
                raise KeyboardInterrupt
            return super().train_step()

    def recipe(name):
        return recipe_from_dict({**tree, "output": {"dir": str(tmp_path / name), "save_model": False}})

    whole = Trainer(recipe("whole"), progress=False)
    whole.train()
    with pytest.raises(KeyboardInterrupt):
        Stop(recipe("broken"), progress=False).train()
    rng = load_file(tmp_path / "broken" / "checkpoints" / "step-00000002" / "rng.safetensors")
    assert any("int8_rounding" in k for k in rng)
    resumed = Trainer(recipe("broken"), resume=True, progress=False)
    resumed.train()
    for (n, a), (_, b) in zip(whole.run.model.named_buffers(), resumed.run.model.named_buffers()):
        assert torch.equal(a, b), n
    assert torch.equal(whole.run.generators["int8_rounding"].get_state(),
                       resumed.run.generators["int8_rounding"].get_state())
    assert _records(tmp_path / "whole") == _records(tmp_path / "broken")


@pytest.mark.parametrize("sections, message", [
    ({"model": {"lora": {"r": 4}}}, "model.dtype: int8 trains the block weights themselves"),
    ({"model": {"quantize": {"bits": 8}, "trainable": ["*norm*"]}}, "model.dtype: int8 trains the weights"),
    ({"optim": {"name": "mezo"}}, "model.dtype: int8 weights take first-order updates; mezo"),
    ({"offload": {"enabled": True}, "optim": {"name": "adamw", "max_grad_norm": None}},
     "model.dtype: int8 weights are trained in memory"),
])
def test_what_int8_weights_cannot_do_is_refused(sections, message):
    from lowmem.recipe import RecipeError, recipe_from_dict

    tree = {"model": {"config": {"model_type": "llama"}, "tokenizer": "bytes", "dtype": "int8"},
            "data": {"path": "x"}, "train": {"steps": 1}, "output": {"dir": "x"}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(tree)
