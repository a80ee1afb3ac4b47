"""lowmem optimizers in a real ``transformers.Trainer``: the callback, layer-wise mode, WTA-CRS,
exact save/resume, and ZOTrainer -- each against an outside truth (a plain run, an
uninterrupted run, a hand-written MeZO loop)."""

import pytest
import torch
from transformers import Trainer

import lowmem
from lowmem.integrations import LowMemCallback, ZOTrainer
from lowmem.memory import state_bytes

from .helpers import flat_params


def _train(model, args, dataset, optimizer, callback=None, cls=Trainer, resume=None):
    trainer = cls(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None),
                  callbacks=[callback] if callback else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_trains_and_logs_memory(tiny_model, token_dataset, trainer_args):
    model = tiny_model()
    opt = lowmem.create_optimizer(model, "apollo_mini", lr=1e-2)
    trainer = _train(model, trainer_args(max_steps=8), token_dataset(), opt, LowMemCallback())
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 8 and logs[-1]["loss"] < logs[0]["loss"]
    # the logged figure is the optimizer's own state, measured; APOLLO-Mini holds less than AdamW
    assert logs[-1]["optimizer_state_mb"] == round(state_bytes(opt) / 2**20, 4)
    dense = tiny_model()
    reference = lowmem.create_optimizer(dense, "adamw", lr=1e-2)
    _train(dense, trainer_args(max_steps=1), token_dataset(), reference)
    assert 0 < state_bytes(opt) < state_bytes(reference)
    assert logs[-1]["peak_rss_gb"] > 0


def test_layerwise_equals_plain_with_accumulation(tiny_model, token_dataset, trainer_args):
    args = trainer_args(max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0)
    finals = []
    for layerwise in (False, True):
        model = tiny_model()
        opt = lowmem.create_optimizer(model, "galore_adamw", lr=1e-2, rank=4, update_proj_gap=2)
        trainer = _train(model, args, token_dataset(), opt, LowMemCallback(layerwise=layerwise))
        finals.append(flat_params(model))
        assert type(trainer.optimizer.optimizer).__name__ == ("LayerwiseOptimizer" if layerwise else "GaLoreAdamW")
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=1e-6)


def test_layerwise_refuses_clipping(tiny_model, token_dataset, trainer_args):
    model = tiny_model()
    opt = lowmem.create_optimizer(model, "adamw", lr=1e-3)
    with pytest.raises(ValueError, match=r"max_grad_norm=0") as err:
        _train(model, trainer_args(max_steps=1), token_dataset(), opt, LowMemCallback(layerwise=True))
    assert "\n" not in str(err.value)


def test_wta_crs_applied_and_keep_ratio_one_is_exact(tiny_model, token_dataset, trainer_args):
    finals = []
    for callback in (None, LowMemCallback(wta_crs_keep_ratio=1.0), LowMemCallback(wta_crs_keep_ratio=0.3)):
        model = tiny_model()
        _train(model, trainer_args(max_steps=3), token_dataset(), lowmem.create_optimizer(model, "adamw", lr=1e-2),
               callback)
        finals.append(flat_params(model))
    swapped = callback.wta_handle.modules
    assert swapped and all(type(m).__name__ != "Linear" for m in swapped.values())
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=1e-6)  # keeps every row: dense gradients
    assert not torch.allclose(finals[2], finals[0], atol=1e-6)  # sampled rows: different updates


def test_lean_modules_train_as_the_plain_ones(tiny_model, token_dataset, trainer_args):
    finals = []
    for callback in (None, LowMemCallback(lean=True)):
        model = tiny_model()
        _train(model, trainer_args(max_steps=3), token_dataset(), lowmem.create_optimizer(model, "adamw", lr=1e-2),
               callback)
        finals.append(flat_params(model))
    assert {type(m).__name__ for m in callback.lean_handle.modules.values()} == {"LeanLlamaMLP", "LeanLlamaRMSNorm"}
    # gradients equal to rounding; Adam (lr 1e-2) turns a rounding flip of a near-zero gradient into ~1e-5
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-4, atol=5e-5)


HPARAMS = {"apollo": {"rank": 4, "update_proj_gap": 2}, "adamw8bit": {"min_8bit_size": 64}, "sgd_sai": {},
           "sinkgd": {"lr_scale": 1.0}}


@pytest.mark.parametrize("name, dtype, wta", [("apollo", torch.bfloat16, 0.5), ("adamw8bit", torch.float32, None),
                                              ("sgd_sai", torch.bfloat16, None), ("sinkgd", torch.float32, None)])
def test_resume_is_exact_and_keeps_state_dtypes(tiny_model, token_dataset, trainer_args, name, dtype, wta):
    hparams = HPARAMS[name]
    args = trainer_args(max_steps=6, save_strategy="steps", save_steps=3)

    def run(resume=None):
        model = tiny_model(dtype=dtype)
        opt = lowmem.create_optimizer(model, name, lr=1e-2, **hparams)
        _train(model, args, token_dataset(), opt, LowMemCallback(wta_crs_keep_ratio=wta), resume=resume)
        return model, opt

    full_model, full_opt = run()
    resumed_model, resumed_opt = run(resume=f"{args.output_dir}/checkpoint-3")
    assert torch.equal(flat_params(resumed_model), flat_params(full_model))
    full_state, resumed_state = full_opt.state_dict()["state"], resumed_opt.state_dict()["state"]
    for i, entries in full_state.items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                assert resumed_state[i][key].dtype == value.dtype, (i, key)
                assert torch.equal(resumed_state[i][key], value), (i, key)


def _mezo_by_hand(model, batch, steps, lr, eps):
    opt = lowmem.create_optimizer(model, "mezo", lr=lr, eps=eps)
    model.eval()
    for _ in range(steps):
        opt.step(lambda: model(**batch).loss)
    return model


def test_zo_trainer_equals_mezo_loop_and_resumes(tiny_model, token_dataset, trainer_args):
    dataset = token_dataset(n=1)  # every step sees the one sequence: the Trainer's shuffle cannot matter
    args = trainer_args(max_steps=4, per_device_train_batch_size=1, save_strategy="steps", save_steps=2)
    model = tiny_model()
    trainer = _train(model, args, dataset, lowmem.create_optimizer(model, "mezo", lr=1e-3, eps=1e-3), cls=ZOTrainer)
    batch = {"input_ids": dataset.ids, "labels": dataset.ids.clone()}
    reference = _mezo_by_hand(tiny_model(), batch, steps=4, lr=1e-3, eps=1e-3)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=0, atol=1e-7)
    assert len([r for r in trainer.state.log_history if "loss" in r]) == 4
    # accelerate's gradient state is one per process: left unsynced, a later Accelerator would skip its steps
    assert trainer.accelerator.gradient_state.sync_gradients

    resumed = tiny_model()
    _train(resumed, args, dataset, lowmem.create_optimizer(resumed, "mezo", lr=1e-3, eps=1e-3), cls=ZOTrainer,
           resume=f"{args.output_dir}/checkpoint-2")
    assert torch.equal(flat_params(resumed), flat_params(model))


def test_zo_trainer_refuses_accumulation_and_first_order(tiny_model, token_dataset, trainer_args):
    model = tiny_model()
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        _train(model, trainer_args(gradient_accumulation_steps=2), token_dataset(),
               lowmem.create_optimizer(model, "mezo", lr=1e-3), cls=ZOTrainer)
    with pytest.raises(ValueError, match="not a zeroth-order optimizer"):
        _train(model, trainer_args(), token_dataset(), lowmem.create_optimizer(model, "adamw", lr=1e-3),
               cls=ZOTrainer)


def test_callback_names_zo_trainer_for_zeroth_order_in_plain_trainer(tiny_model, token_dataset, trainer_args):
    model = tiny_model()
    with pytest.raises(ValueError, match="use lowmem.ZOTrainer"):
        _train(model, trainer_args(max_steps=1), token_dataset(), lowmem.create_optimizer(model, "mezo", lr=1e-3),
               LowMemCallback())
