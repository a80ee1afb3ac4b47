"""The recipe: a YAML file mapped onto nested typed models (pydantic v2).

Every section forbids unknown keys; field descriptions are the help text.
``load_recipe(path, overrides=["train.steps=10", ...])`` applies ``a.b=c``
overrides (values parsed as YAML) before validation and raises
:class:`RecipeError` with one line naming the file and the dotted field.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lowmem.dtypes import MixedPrecision, WeightDtypeName, native_bf16_precision
from lowmem.offload.settings import OffloadSection
from lowmem.optim.registry import get_spec
from lowmem.settings import Section, one_line
from lowmem.steps import step_class


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the file and field."""


class LoraSection(Section):
    r: int = Field(8, ge=1, description="Adapter rank")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the adapter output is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input")
    target_modules: list[str] = Field(["q_proj", "v_proj"], description="Module names (suffixes) that get "
                                                                          "adapters, as peft's target_modules")


class QuantizeSection(Section):
    bits: Literal[4, 8] = Field(..., description="4: bitsandbytes Linear4bit (QLoRA); 8: Linear8bitLt (LLM.int8())")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: NormalFloat4 or FP4")
    double_quant: bool = Field(False, description="4 bits: quantize the blocks' absmax constants too (QLoRA §3)")

    @model_validator(mode="after")
    def _four_bit_options(self):
        # refused only when changed from their defaults, so a dumped recipe (``model_dump``) loads again
        if self.bits == 8 and (self.type != "nf4" or self.double_quant):
            raise ValueError("model.quantize: type and double_quant are 4-bit options; drop them with bits: 8")
        return self


class ModelSection(Section):
    path: str | None = Field(None, description="Local directory, hub id, or 'pkg:<package>[/sub/dir]' "
                                               "(a directory inside an installed Python package)")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` (loaded with the gguf package)")
    config: dict[str, Any] | None = Field(None, description="Build a randomly initialised model from this "
                                                            "config dict (needs `model_type`) instead of loading")
    tokenizer: str | None = Field(None, description="Tokenizer path/'pkg:' dir, or 'bytes' for a built-in "
                                                    "byte tokenizer; default: the model's")
    dtype: WeightDtypeName = Field("float32", description="Weight dtype; int8: the decoder blocks' Linear weights "
                                   "held and trained in blockwise int8 with stochastic rounding (Q-GaLore), "
                                   "computing in train.mixed_precision's dtype, else fp32")
    gradient_checkpointing: bool = Field(False, description="Recompute block activations in backward")
    seed: int = Field(0, description="Seed of a config-built model's initialisation")
    lora: LoraSection | None = Field(None, description="Train LoRA adapters (peft) instead of the weights; "
                                                       "the saved model is the adapter (with model.trainable's "
                                                       "modules as peft's modules_to_save)")
    trainable: list[str] | None = Field(None, description="Glob patterns on parameter names (e.g. '*norm*'): "
                                                          "train only these (with lora: these plus the adapters)")
    quantize: QuantizeSection | None = Field(None, description="Frozen quantized base ({bits: 4, type: nf4, "
                                             "double_quant: true} or {bits: 8}): the Linear layers held by "
                                             "bitsandbytes, trained through model.lora or model.trainable")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of model.path and model.config")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a model_type (e.g. llama)")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("model.tokenizer is required with model.config (e.g. 'bytes')")
        return self

    @model_validator(mode="after")
    def _frozen_base(self):
        if self.quantize is not None and self.dtype == "int8":
            raise ValueError("model.dtype: int8 trains the weights themselves; a frozen quantized base "
                             "(model.quantize) computes in a float dtype: choose one")
        if self.lora is not None and self.dtype == "int8":
            raise ValueError("model.dtype: int8 trains the block weights themselves; for adapters on an 8-bit base "
                             "use model.quantize: {bits: 8} with model.lora")
        if self.quantize is not None and self.lora is None and self.trainable is None:
            raise ValueError("model.quantize: a quantized base is frozen; train it through model.lora or a "
                             "model.trainable subset (full-parameter int8 training: model.dtype: int8)")
        return self


class ClassificationSection(Section):
    template: str = Field("{text}\nTopic:", description="Prompt; `{text}` is replaced by the document")
    candidates: dict[str, str] = Field(..., description="Label (folder name) -> verbalizer, e.g. tech: ' tech'")


class SftFieldsSection(Section):
    messages: str = Field("messages", description="Field of a conversation: a list of {role, content} turns")
    prompt: str = Field("prompt", description="Field of a prompt (with `completion`)")
    completion: str = Field("completion", description="Field of the answer to `prompt`")
    instruction: str = Field("instruction", description="Alpaca-style instruction (with `output`)")
    input: str = Field("input", description="Alpaca-style optional input, appended to the instruction after a "
                                            "blank line")
    output: str = Field("output", description="Alpaca-style answer")


class SftSection(Section):
    fields: SftFieldsSection = Field(SftFieldsSection(), description="Record field names; a record is a "
                                     "conversation (messages), a prompt/completion pair, or an alpaca record, "
                                     "in that order of precedence")
    chat_template: bool = Field(True, description="Render prompt/completion and alpaca records as a user turn and "
                                "an assistant turn with the tokenizer's chat template; false: plain text "
                                "`prompt + completion + EOS` (conversations always use the template)")
    train_on_prompt: bool = Field(False, description="Loss on every token, prompts and user turns too; false: on "
                                  "the assistant turns / completions only")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="An example longer than train.seq_len: "
                                                  "keep its first seq_len tokens (dropped if no answer token is "
                                                  "left), or drop it; counted in summary.json")


class DataSection(Section):
    path: str = Field(..., description="A .txt/.jsonl file, a directory of them (searched recursively), or 'pkg:' "
                                       "dir; data.task sft: .jsonl/.json/.parquet files")
    eval_path: str | None = Field(None, description="Held-out data; default: a split of `path`")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="Fraction of documents held out when no eval_path")
    text_field: str = Field("text", description="JSONL field holding the text")
    max_documents: int | None = Field(None, ge=1, description="Use at most this many documents (after shuffling)")
    task: Literal["lm", "classification", "sft"] = Field("lm", description="Causal LM loss, candidate "
                                                         "classification, or supervised fine-tuning on "
                                                         "conversations / prompt-completion pairs (data.sft)")
    packing: bool = Field(True, description="lm/sft: pack documents into rows of train.seq_len, position_ids "
                                            "restarting at each document (no attention across documents); false: "
                                            "one document per row, padded to the longest of its micro-batch")
    sft: SftSection = Field(SftSection(), description="Supervised fine-tuning data (data.task: sft)")
    classification: ClassificationSection | None = Field(None, description="Template and candidates "
                                                                           "(data.task: classification)")

    @model_validator(mode="after")
    def _task_fields(self):
        if self.task == "classification" and self.classification is None:
            raise ValueError("data.classification is required when data.task is classification")
        return self


class OptimSection(Section):
    name: str = Field("adamw", description="Registered optimizer (lowmem.optim.available())")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate")
    weight_decay: float | None = Field(None, ge=0, description="Decoupled weight decay; default: the optimizer's")
    args: dict[str, Any] = Field(default_factory=dict, description="Further optimizer arguments, typed per "
                                                                   "optimizer (see the optimizer arguments below)")
    target_modules: list[str] | None = Field(None, description="Glob patterns of nn.Linear modules that get the "
                                                               "memory-saving method; default: Linear layers in blocks")
    layerwise: bool = Field(False, description="Update each parameter inside backward and free its gradient")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null: no clipping")

    @model_validator(mode="after")
    def _typed_args(self):
        """Names, types and ranges of ``optim.args`` against the optimizer's own (lowmem.optim.args)."""
        from lowmem.optim.registry import check_hparams

        for key in ("lr", "weight_decay"):
            if key in self.args:
                raise ValueError(f"optim.args.{key}: set optim.{key} instead")
        check_hparams(self.name, self.args)
        return self


class WtaCrsSection(Section):
    keep_ratio: float = Field(0.3, gt=0, le=1, description="Fraction of activation rows kept for backward")
    targets: list[str] | None = Field(None, description="Glob patterns of Linear modules; default: see lowmem.activations")


class ActivationsSection(Section):
    wta_crs: WtaCrsSection | None = Field(None, description="WTA-CRS activation sampling of Linear layers "
                                                           "({keep_ratio, targets}); null: off")
    lean: bool = Field(False, description="RMSNorm and gated MLP keep only their inputs for backward and recompute "
                                          "the element-wise rest (same forward; see lowmem.activations.lean)")


class TrainSection(Section):
    steps: int = Field(..., ge=1, description="Optimizer steps")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step")
    seq_len: int = Field(256, ge=8, description="Tokens per packed sequence")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup (transformers' "
                                   "constant/polynomial(power 1)/cosine_with_min_lr schedules)")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from LR 0 over these steps "
                              "(transformers' schedulers: the first step has LR 0)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak (linear/cosine)")
    mixed_precision: Literal["auto"] | MixedPrecision = Field(
        "no", description="Autocast (weights keep model.dtype); auto: bf16 where this machine multiplies bf16 "
                          "in hardware (a CUDA GPU with bf16, a CPU with AVX-512), else no")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: only before and after training)")
    eval_batches: int = Field(8, ge=1, description="Micro-batches per evaluation")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: never)")
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept (oldest deleted first)")
    log_every: int = Field(1, ge=1)
    max_bad_steps: int = Field(5, ge=1, description="Stop after this many non-finite steps in a row")
    seed: int = Field(0, description="Seeds data order, dropout and samplers")
    device_memory_gb: float | None = Field(None, gt=0, description="Memory of the target device (GiB): the CLI "
                                                                   "plans the run and refuses one predicted not to fit")
    loss_chunk_tokens: int | None = Field(None, ge=1, description="LM loss over chunks of this many tokens, logits "
                                                                  "recomputed in backward (no (tokens, vocab) logits "
                                                                  "kept); null: the model's own loss")
    distributed: Literal["ddp", "fsdp2"] = Field("ddp", description="Several processes: ddp (every process holds "
                                                 "the whole model) or fsdp2 (weights, gradients, optimizer state "
                                                 "sharded by PyTorch FSDP2; README, Sharded data parallel)")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _resolve_auto(cls, value):
        if value is False:  # YAML 1.1 reads a bare `no` as false
            return "no"
        return native_bf16_precision() if value == "auto" else value


class OutputSection(Section):
    dir: str = Field(..., description="Run directory: metrics.jsonl, checkpoints/, model/, summary.json")
    save_model: bool = Field(True, description="Write the fine-tuned model (save_pretrained) to dir/model")


class Recipe(Section):
    model: ModelSection
    data: DataSection
    optim: OptimSection = OptimSection()
    train: TrainSection
    activations: ActivationsSection = ActivationsSection()
    offload: OffloadSection = OffloadSection()
    output: OutputSection

    @model_validator(mode="after")
    def _chunked_loss(self):
        if self.train.loss_chunk_tokens is not None and self.data.task == "classification":
            raise ValueError("train.loss_chunk_tokens: applies to the LM objective only (data.task: lm or sft); "
                             "set it to null")
        return self

    @model_validator(mode="after")
    def _step_rules(self):
        """What the way this recipe steps refuses, stated once by its step class (lowmem.steps)."""
        step_class(self, get_spec(self.optim.name).zeroth_order).check(self)
        return self


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{source}: cannot set {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value, f"override {item!r}")
    return tree


def drop_other_optimizer_args(tree: dict, overrides: list[str], source: str) -> dict:
    """``optim.name`` overridden on a recipe whose file sets ``optim.args`` for its own optimizer (the default
    recipe's APOLLO-Mini ``scale_front``): the file's arguments the new optimizer does not take are dropped,
    with a one-line notice on stderr, so any optimizer can be tried from any recipe. Arguments given as
    overrides are kept (and checked)."""
    given = {item.partition("=")[0].strip() for item in overrides}
    optim = tree.get("optim")
    if "optim.name" not in given or "optim.args" in given or not isinstance(optim, dict) \
            or not isinstance(optim.get("args"), dict):
        return tree
    from lowmem.optim.registry import accepted_hparams

    try:
        accepted = accepted_hparams(str(optim.get("name")))
    except ValueError:  # an unknown optimizer: the validation names it
        return tree
    dropped = [k for k in optim["args"] if k not in accepted and f"optim.args.{k}" not in given]
    if dropped:
        optim["args"] = {k: v for k, v in optim["args"].items() if k not in dropped}
        print(f"lowmem-train: {source}: optim.name overridden to {optim['name']!r}: dropped the recipe's optim.args "
              f"{', '.join(dropped)} (not arguments of {optim['name']!r})", file=sys.stderr)
    return tree


def recipe_from_dict(tree: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(f"{source}: {one_line(err, Recipe)}") from None
    except ValueError as err:  # raised inside validators that import optimizers
        raise RecipeError(f"{source}: {str(err).splitlines()[0]}") from None


def with_overrides(recipe: Recipe, overrides: list[str], source: str = "suggestion") -> Recipe:
    """``recipe`` with ``a.b=c`` overrides applied, validated again (the planner's suggestions)."""
    return recipe_from_dict(apply_overrides(recipe.model_dump(), list(overrides)), source)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise RecipeError(f"{path}: cannot read recipe ({err.strerror})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: malformed YAML{where}") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with sections model, data, optim, train, output")
    tree = apply_overrides(copy.deepcopy(tree), list(overrides))
    return recipe_from_dict(drop_other_optimizer_args(tree, list(overrides), str(path)), str(path))


def reference_markdown() -> str:
    """The recipe reference (one table per section) generated from the schema: the README embeds it."""
    lines = []
    sections = [(name, field.annotation) for name, field in Recipe.model_fields.items()]
    sections += [("model.quantize", QuantizeSection), ("data.classification", ClassificationSection),
                 ("data.sft", SftSection), ("data.sft.fields", SftFieldsSection),
                 ("activations.wta_crs", WtaCrsSection)]
    for section, model in sections:
        lines += [f"**`{section}`**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, sub in model.model_fields.items():
            kind = re.sub(r"<class '([\w.]+)'>", r"\1", str(sub.annotation))
            kind = re.sub(r"\b\w+\.", "", kind).replace("|", "or")  # drop module paths
            default = "required" if sub.is_required() else repr(sub.get_default(call_default_factory=True))
            lines.append(f"| `{name}` | {kind} | `{default}` | {sub.description or ''} |")
        lines.append("")
    from lowmem.optim.registry import args_reference

    return "\n".join(lines + args_reference())


if __name__ == "__main__":
    print(reference_markdown())
