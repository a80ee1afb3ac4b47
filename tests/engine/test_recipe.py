"""Recipe validation: unknown keys, wrong types, ranges, overrides, and every shipped recipe."""

from pathlib import Path

import pytest

from lowmem.optim.registry import available
from lowmem.recipe import RecipeError, load_recipe

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
DEFAULT = Path(__file__).parents[2] / "recipes" / "default.yaml"


def test_valid_recipe_and_overrides(tiny_recipe):
    recipe = load_recipe(tiny_recipe(), ["train.steps=9", "optim.lr=3e-4", "optim.args.betas=[0.8, 0.9]"])
    assert recipe.train.steps == 9
    assert recipe.optim.lr == 3e-4
    assert recipe.optim.args["betas"] == [0.8, 0.9]


@pytest.mark.parametrize("override, field", [
    ("train.stepz=3", "train.stepz: unknown key"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=0", "train.steps"),
    ("optim.name=adamx", "optim.name: unknown optimizer 'adamx'"),
    ("optim.args.rnak=4", "optim.args.rnak"),
    ("data.eval_fraction=1.5", "data.eval_fraction"),
    ("bogus.key=1", "bogus: unknown key"),
    ("train.loss_chunk_tokens=0", "train.loss_chunk_tokens"),
    ("train.loss_chunk_tokens=many", "train.loss_chunk_tokens"),
])
def test_bad_fields_name_the_field_in_one_line(tiny_recipe, override, field):
    with pytest.raises(RecipeError) as err:
        load_recipe(tiny_recipe(), [override])
    message = str(err.value)
    assert field in message, message
    assert "\n" not in message


@pytest.mark.parametrize("native", ["bf16", "no"])
def test_mixed_precision_auto_is_resolved_when_the_recipe_loads(tiny_recipe, monkeypatch, native):
    import lowmem.recipe

    # the recipe calls the name it imported from lowmem.dtypes: patched where it is looked up (both values
    # of ``native`` are asserted, so a patch that did not take effect fails one of them on any machine)
    monkeypatch.setattr(lowmem.recipe, "native_bf16_precision", lambda: native)
    assert load_recipe(tiny_recipe(), ["train.mixed_precision=auto"]).train.mixed_precision == native
    assert load_recipe(tiny_recipe(), ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    assert load_recipe(tiny_recipe(), ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML's false


@pytest.mark.parametrize("field", ["swap_activations", "offload_embeddings"])
def test_offload_switches_accept_yaml_on_and_off(tiny_recipe, field):
    """YAML 1.1 reads a bare ``on``/``off`` as a boolean; the switches take them as written."""
    for word in ["on", "off", "auto"]:
        recipe = load_recipe(tiny_recipe(), [f"offload.{field}={word}"])
        assert getattr(recipe.offload, field) == word
    with pytest.raises(RecipeError, match=f"offload.{field}"):
        load_recipe(tiny_recipe(), [f"offload.{field}=sometimes"])


def test_native_bf16_probe_matches_the_cpu():
    """On a CPU, ``auto`` picks bf16 exactly where oneDNN runs bf16 matmuls (AVX-512 and up)."""
    import torch

    from lowmem.dtypes import native_bf16_precision

    if torch.cuda.is_available():
        pytest.skip("the CPU rule; a GPU machine resolves through torch.cuda.is_bf16_supported()")
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert native_bf16_precision() == ("bf16" if avx512 else "no")


@pytest.mark.parametrize("name, override, message", [
    ("galore_adamw", "optim.args.rank=four", "optim.args.rank: must be a valid integer, got 'four'"),
    ("galore_adamw", "optim.args.proj_type=diagonal", "optim.args.proj_type: must be 'std'"),
    ("apollo_mini", "optim.args.eps=-1.0e-8", "optim.args.eps: must be greater than or equal to 0, got -1e-08"),
    ("mezo", "optim.args.eps=0", "optim.args.eps: must be greater than 0, got 0"),
    ("adamw", "optim.args.betas=[0.9, 1.5]", "optim.args.betas[1]: must be less than 1, got 1.5"),
    ("frugal", "optim.args.density=1.5", "optim.args.density: must be less than or equal to 1, got 1.5"),
    ("swan", "optim.args.ns_steps=-1", "optim.args.ns_steps: must be greater than or equal to 0, got -1"),
    ("sgd_sai", "optim.args.momentm=0.5", "optim.args.momentm: not an argument of optimizer 'sgd_sai'"),
    ("zo_adamu", "optim.args.momentum_dtype=int4", "optim.args.momentum_dtype: must be 'float32'"),
    ("adamw", "optim.args.lr=0.1", "optim.args.lr: set optim.lr instead"),
    ("apollo", "optim.args.proj_type=full", "optim.args.proj_type: 'full' needs proj='svd'"),
])
def test_optimizer_args_are_typed_when_the_recipe_loads(tiny_recipe, name, override, message):
    """A bad type, a value out of range or an unknown name: one line naming optim.args.X, from
    ``load_recipe`` alone (no model, tokenizer or data is read)."""
    with pytest.raises(RecipeError) as err:
        load_recipe(tiny_recipe(optim={"name": name}), [override])
    assert str(err.value).split(": ", 1)[1].startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x\ntrain: [")
    with pytest.raises(RecipeError, match=r"bad.yaml: malformed YAML at line"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match=r"nope.yaml: cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_model_needs_exactly_one_source(tiny_recipe):
    with pytest.raises(RecipeError, match="exactly one of model.path and model.config"):
        load_recipe(tiny_recipe(), ["model.path=somewhere"])


def test_loss_chunk_tokens_default_and_where_it_does_not_apply(tiny_recipe):
    assert load_recipe(tiny_recipe()).train.loss_chunk_tokens is None
    assert load_recipe(tiny_recipe(), ["train.loss_chunk_tokens=64"]).train.loss_chunk_tokens == 64
    for overrides, reason in [(["offload.enabled=true", "optim.name=mezo"], "offload.enabled"),
                              (["data.task=classification", "data.classification={candidates: {a: ' a', b: ' b'}}"],
                               "data.task: lm")]:
        with pytest.raises(RecipeError, match=f"train.loss_chunk_tokens: .*{reason}") as err:
            load_recipe(tiny_recipe(), ["train.loss_chunk_tokens=64", *overrides])
        assert "\n" not in str(err.value)


def test_a_typo_in_the_file_leads_with_the_unknown_key_and_its_closest_name(tiny_recipe):
    """``step: 30`` also leaves ``train.steps`` missing: the unknown key is the cause, so it comes first."""
    recipe = Path(tiny_recipe())
    recipe.write_text(recipe.read_text().replace("  steps: 6", "  step: 6"))
    with pytest.raises(RecipeError, match=r"train.step: unknown key \(did you mean train.steps\?\) \(\+1 more\)$"):
        load_recipe(recipe)
    with pytest.raises(RecipeError, match=r"data.eval_frac: unknown key \(did you mean data.eval_fraction\?\)$"):
        load_recipe(tiny_recipe("other.yaml"), ["data.eval_frac=0.1"])


@pytest.mark.parametrize("name", [n for n in available() if n != "apollo_mini"])
def test_optim_name_overridden_on_the_default_recipe_drops_the_other_optimizers_args(name, capsys):
    """The default recipe's APOLLO-Mini ``scale_front`` would make every other optimizer fail; it is dropped
    with a one-line notice when optim.name is overridden, kept where the optimizer takes it (APOLLO)."""
    recipe = load_recipe(DEFAULT, [f"optim.name={name}"])
    notice = capsys.readouterr().err
    assert recipe.optim.name == name
    if name == "apollo":
        assert recipe.optim.args == {"scale_front": True} and notice == ""
    else:
        assert recipe.optim.args == {}
        assert notice.count("\n") == 1 and "dropped the recipe's optim.args scale_front" in notice
    with pytest.raises(RecipeError, match="optim.args.scale_front: not an argument"):  # given, not dropped
        load_recipe(DEFAULT, ["optim.name=sinkgd", "optim.args.scale_front=true"])


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates_offline(path):
    recipe = load_recipe(path)
    assert recipe.train.steps >= 1
