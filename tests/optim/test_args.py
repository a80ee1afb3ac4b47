"""Typed optimizer arguments: one definition (the constructor's signature) checked from Python and
from the recipe with the same one-line messages; the recipe's model matches what the optimizer uses."""

import inspect

import pytest
import torch

from lowmem.optim.args import signature_model
from lowmem.optim.registry import args_model, available, check_hparams, create_optimizer, get_spec

BAD = [  # (optimizer, argument, bad value, the message's start)
    ("galore_adamw", "eps", -1e-8, "optim.args.eps: must be greater than or equal to 0"),
    ("galore_adamw", "state_bits", 4, "optim.args.state_bits: must be 8 or 32"),
    ("apollo", "betas", (0.9, 1.5), "optim.args.betas[1]: must be less than 1"),
    ("adamw8bit", "eps", 0.0, "optim.args.eps: must be greater than 0"),
    ("adamw8bit", "blocksize", 100, "optim.args.blocksize: must be a power of two"),
    ("sgd8bit", "momentum", 0.0, "optim.args.momentum: must be greater than 0"),
    ("mezo", "n_samples", "two", "optim.args.n_samples: must be a valid integer"),
    ("mezo", "noise", "uniform", "optim.args.noise: one of gaussian"),
    ("zo_adamu", "momentum_dtype", "int4", "optim.args.momentum_dtype: must be 'float32'"),
    ("sgd_sai", "lr", -0.1, "optim.lr: must be greater than or equal to 0"),
    ("frugal", "seed", True, "optim.args.seed: must be a valid integer"),
    ("adamw", "eps", -1.0, "optim.args.eps: must be greater than or equal to 0"),
]


@pytest.mark.parametrize("name, arg, value, message", BAD, ids=[f"{b[0]}-{b[1]}" for b in BAD])
def test_the_registry_and_the_constructor_give_the_same_one_line(tiny_model, name, arg, value, message):
    with pytest.raises(ValueError) as from_registry:
        check_hparams(name, {arg: value})
    assert str(from_registry.value).startswith(message) and "\n" not in str(from_registry.value)
    assert "got " in str(from_registry.value)
    if name == "adamw":  # torch's own constructor keeps torch's messages
        return
    with pytest.raises(ValueError) as from_constructor:
        get_spec(name).cls(list(tiny_model().parameters()), **{arg: value})
    assert str(from_constructor.value) == str(from_registry.value)


@pytest.mark.parametrize("name", ["galore_adamw", "apollo_mini", "frugal", "swan", "sinkgd"])
def test_group_keys_are_checked_by_the_constructor_with_the_group_model(name):
    spec = get_spec(name)
    key = "update_proj_gap" if "update_proj_gap" in spec.target_keys else spec.target_keys[0]
    with pytest.raises(ValueError) as from_registry:
        check_hparams(name, {key: -3})
    group = {"params": [torch.nn.Parameter(torch.randn(6, 4))], **dict(spec.group()), key: -3}
    with pytest.raises(ValueError) as from_constructor:
        spec.cls([group])
    assert str(from_constructor.value) == str(from_registry.value)
    assert str(from_registry.value).startswith(f"optim.args.{key}: must be greater than or equal to")


def test_unknown_argument_names_the_accepted_ones():
    with pytest.raises(ValueError, match=r"^optim.args.rnak: not an argument of optimizer 'galore_adamw'; did you "
                                         r"mean optim.args.rank\? \(accepted: .*rank.*update_proj_gap"):
        check_hparams("galore_adamw", {"rnak": 4})


@pytest.mark.parametrize("name", ["galore_adamw", "mezo", "adamw"])
def test_the_accepted_list_holds_only_optim_args(name):
    """lr and weight_decay are optim.lr / optim.weight_decay; MeZO's process_group is the trainer's."""
    with pytest.raises(ValueError) as err:
        check_hparams(name, {"rnak": 4})
    accepted = str(err.value).split("(accepted: ")[1].rstrip(")").split(", ")
    assert accepted and not {"lr", "weight_decay", "process_group"} & set(accepted), accepted


@pytest.mark.parametrize("name", available())
def test_the_model_holds_the_signature_defaults_and_builds_the_optimizer(tiny_model, name):
    """The recipe's model of optim.args is the constructor's signature (names and defaults) plus the
    target group's keys; every default passes the optimizer's own checks."""
    spec = get_spec(name)
    model = args_model(name)
    sig = inspect.signature(spec.cls.__init__)
    for arg, p in sig.parameters.items():
        if arg not in ("self", "params"):
            assert model.model_fields[arg].default == p.default, arg
    assert set(model.model_fields) == set(signature_model(inspect.unwrap(spec.cls.__init__))
                                          .model_fields) | set(spec.target_keys)
    defaults = {k: v for k, v in dict(model()).items() if k not in ("process_group", "foreach", "fused")}
    opt = create_optimizer(tiny_model(), name, **defaults)
    targets = [g for g in opt.param_groups if spec.target_keys and spec.target_keys[0] in g]
    assert all(g[k] == defaults[k] for g in targets for k in spec.target_keys)


def test_apollo_mini_defaults_reach_the_target_group(tiny_model):
    opt = create_optimizer(tiny_model(), "apollo_mini", lr=1e-3)
    target = opt.param_groups[0]
    assert (target["rank"], target["scale_type"], target["scale"]) == (1, "tensor", 128.0)
    assert dict(args_model("apollo_mini")())["rank"] == 1 and dict(args_model("apollo")())["rank"] == 256


def test_validated_values_reach_the_optimizer_converted(tiny_model):
    from lowmem.optim.adamw8bit import AdamW8bit

    opt = AdamW8bit(list(tiny_model().parameters()), betas=[0.8, 0.9], lr=1, fp32_state_params=["*x*"])
    assert opt.defaults["betas"] == (0.8, 0.9) and isinstance(opt.defaults["lr"], float)
    assert opt.fp32_state_params == ("*x*",)
