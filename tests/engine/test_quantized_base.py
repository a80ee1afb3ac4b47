"""A frozen quantized base (``model.quantize``, lowmem.quantized_base): the loaded model's Linear layers
compute what bitsandbytes' own layers compute on the same weights; LoRA (first order) and MeZO train and
perturb only the adapters; a run resumes exactly; what cannot work is refused in one line."""

import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from conftest import TINY_MODEL
from test_trainable import assert_peft_reloads_the_trained_model

from lowmem.models import load_model
from lowmem.recipe import ModelSection, RecipeError, load_recipe
from lowmem.trainer import Trainer

pytest.importorskip("peft")

# bitsandbytes' 4-bit blocks are 64 weights: in_features a multiple of 64
QMODEL = {**TINY_MODEL, "config": {**TINY_MODEL["config"], "hidden_size": 64, "intermediate_size": 128}}
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
NF4 = {"bits": 4, "type": "nf4", "double_quant": True}
QUANTIZE = {"nf4-double": NF4, "fp4": {"bits": 4, "type": "fp4"}, "int8": {"bits": 8}}
MEZO = {"name": "mezo", "lr": 1e-2, "args": {"eps": 1e-3}}


def _reference_layer(weight: torch.Tensor, quantize: dict) -> torch.nn.Module:
    """bitsandbytes' own layer holding ``weight``, quantized by bitsandbytes on its own."""
    out_f, in_f = weight.shape
    if quantize["bits"] == 8:
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32,
                                  quant_type=quantize["type"], compress_statistics=quantize.get("double_quant", False))
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=quantize["type"],
                                         compress_statistics=quantize.get("double_quant", False))
        layer.support_avx512bf16_for_cpu = False
    return layer.to("cpu").eval()


def _dequantized(layer) -> torch.Tensor:
    """The dense weight a quantized layer stands for (bitsandbytes' dequantization)."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    scales = layer.state.SCB if layer.weight.SCB is None else layer.weight.SCB  # moved to .state by a forward
    return layer.weight.data.float() * scales.float()[:, None] / 127  # LLM.int8(): row absmax / 127


@pytest.mark.parametrize("name", QUANTIZE)
def test_forward_matches_bitsandbytes_layers_on_the_same_weights(name):
    """Every quantized Linear equals bitsandbytes' layer built from the unquantized weight, and the whole model's
    logits equal a dense model holding the dequantized weights (outside truth: bitsandbytes' own quantizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    section = ModelSection(**{**QMODEL, "quantize": QUANTIZE[name], "trainable": ["*norm*"]})
    dense_cfg = dict(QMODEL["config"])
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(dense_cfg.pop("model_type"), **dense_cfg))
    model = load_model(section).eval()
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    assert len(quantized) == 2 * 7 and "lm_head" not in quantized  # q k v o gate up down per block
    for mname, layer in quantized.items():
        original = dense.get_submodule(mname).weight.detach()
        ref = _reference_layer(original, QUANTIZE[name])
        x = torch.randn(5, original.shape[1])
        with torch.no_grad():
            assert torch.equal(layer(x), ref(x)), mname
        dense.get_submodule(mname).weight.data.copy_(_dequantized(layer))
    ids = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, dense(input_ids=ids).logits
    # int8: LLM.int8() multiplies fp16-cast activations by int8 codes (not the dequantized fp32 weight)
    torch.testing.assert_close(got, want, **({"atol": 2e-2, "rtol": 2e-2} if name == "int8" else {}))


def _state(model) -> dict[str, torch.Tensor]:
    """Every tensor the model holds: parameters, buffers and the 4-bit layers' quantization constants."""
    out = {n: t.detach().clone() for n, t in model.state_dict().items()}
    assert any("absmax" in n for n in out) or any("SCB" in n for n in out)
    return out


@pytest.mark.parametrize("quantize, optim", [("nf4-double", {"name": "adamw", "lr": 1e-2}), ("int8", MEZO)])
def test_lora_on_a_quantized_base_trains_only_the_adapters(tiny_recipe, quantize, optim):
    """First order (after the trainer's evaluation: the regression of bitsandbytes' CPU repacking, which
    zeroed every gradient) and MeZO: the adapters change, nothing else does, gradients are not zero."""
    trainer = Trainer(load_recipe(tiny_recipe(model={**QMODEL, "quantize": QUANTIZE[quantize], "lora": LORA},
                                              optim=optim, train={"steps": 2, "checkpoint_every": 0})),
                      progress=False)
    model = trainer.run.model
    before = _state(model)
    summary = trainer.train()
    after = _state(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert len(changed) == 2 * 2 * 2 and all("lora_" in n for n in changed)
    assert summary["eval_loss"] != summary["eval_loss_before"]


def test_saved_adapter_on_a_4bit_base_holds_the_trained_norms(tiny_recipe, tmp_path):
    """LoRA with trained norms (peft's k-bit preparation holds them in fp32) on a 4-bit base: peft reloads them
    with the adapters onto the same quantized base."""
    recipe = tiny_recipe(model={**QMODEL, "quantize": NF4, "lora": LORA, "trainable": ["*norm*"]},
                         optim={"name": "adamw", "lr": 1e-2}, train={"steps": 2, "checkpoint_every": 0})
    assert_peft_reloads_the_trained_model(recipe, tmp_path / "run")


def test_mezo_perturbs_only_the_adapters(tiny_recipe):
    """MeZO on a 4-bit base with LoRA: its parameters are the adapters, and inside the closure (a perturbed
    forward) the base's codes, constants and norms are those before the step."""
    trainer = Trainer(load_recipe(tiny_recipe(model={**QMODEL, "quantize": NF4, "lora": LORA}, optim=MEZO)),
                      progress=False)
    model, optimizer = trainer.run.model, trainer.run.inner_optimizer
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    adapters = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert stepped == adapters
    before = _state(model)
    seen = []

    def snapshot(module, args):
        seen.append({n: t for n, t in _state(model).items() if "lora_" not in n})

    handle = model.base_model.model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(snapshot)
    trainer.run.stepper.step(lambda i: next(iter(trainer.run.eval_batches)))
    handle.remove()
    assert len(seen) == 2  # the +eps and -eps forwards
    for during in seen:
        assert all(torch.equal(during[n], before[n]) for n in during)
    lora = [n for n in before if "lora_A" in n]
    assert not any(torch.equal(before[n], _state(model)[n]) for n in lora)


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(r).items() if k != "tokens_per_s"} for r in lines]


def test_lora_on_a_4bit_base_resumes_exactly(tiny_recipe, tmp_path):
    """Interrupted after the checkpoint at step 2 and resumed: every logged loss and the final adapters
    equal those of the uninterrupted run, bit for bit."""
    class Stop(Trainer):
        def train_step(self):
            if self.step == 3:
                raise KeyboardInterrupt
            return super().train_step()

    recipe = tiny_recipe(model={**QMODEL, "quantize": NF4, "lora": LORA}, optim={"name": "adamw", "lr": 1e-2},
                         train={"steps": 4, "checkpoint_every": 2}, output={"dir": str(tmp_path / "x"),
                                                                            "save_model": False})
    whole = Trainer(load_recipe(recipe, [f"output.dir={tmp_path / 'whole'}"]), progress=False)
    whole.train()
    with pytest.raises(KeyboardInterrupt):
        Stop(load_recipe(recipe, [f"output.dir={tmp_path / 'broken'}"]), progress=False).train()
    resumed = Trainer(load_recipe(recipe, [f"output.dir={tmp_path / 'broken'}"]), resume=True, progress=False)
    resumed.train()
    a, b = _state(whole.run.model), _state(resumed.run.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(tmp_path / "whole") == _records(tmp_path / "broken")


@pytest.mark.parametrize("model, message", [
    ({"quantize": NF4}, "model.quantize: a quantized base is frozen"),
    ({"quantize": {"bits": 8, "double_quant": True}, "lora": LORA}, "model.quantize: type and double_quant"),
])
def test_a_recipe_that_cannot_work_is_refused(tiny_recipe, model, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(tiny_recipe(model={**QMODEL, **model}))
    with pytest.raises(RecipeError, match="model.quantize: the offload engines"):
        load_recipe(tiny_recipe(model={**QMODEL, "quantize": NF4, "trainable": ["*norm*"]}, optim=MEZO,
                                offload={"enabled": True}))


def test_training_a_quantized_weight_is_refused():
    """Raised while the model loads, as the ValueError the CLI prints in one line (exit code 2)."""
    with pytest.raises(ValueError, match=r"^model.trainable: '\*q_proj\*' matches 'model.layers.0.self_attn.q_proj"
                                         r".weight', a weight held quantized"):
        load_model(ModelSection(**{**QMODEL, "quantize": NF4, "trainable": ["*q_proj*"]}))
