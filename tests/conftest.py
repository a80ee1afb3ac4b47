"""Shared test set-up.

Without CUDA the Triton kernels are defined for the interpreter: TRITON_INTERPRET must be set when a
``@triton.jit`` function is defined, so it is set here, at collection time, while lowmem's kernel modules
are imported. With a GPU it is left alone: the ``gpu`` tests must run the compiled kernels (the
interpreter's fp32 -> bf16 cast truncates where the compiled kernel rounds).

Which path a call takes is read at call time (:func:`lowmem.kernels.quantize.use_triton`): once the kernels
are defined the variable is removed again, so every test that is not about the kernels runs the 8-bit
steps on the C CPU kernels (:mod:`lowmem.kernels.blockwise_cpu`, bit-identical to the references) and the
perturbations on the PyTorch reference, not in the interpreter (seconds per call); so do the processes the
tests start. The kernel tests set it back (fixture ``triton_interpreter``, autouse in tests/kernels) and
compare the interpreted Triton kernels with the references; a few others ask for it where the kernel
inside an optimizer or engine is what they test.
"""

import os
from pathlib import Path

_CACHE = Path(__file__).resolve().parents[1] / ".cache"  # caches stay inside the work tree
os.environ.setdefault("HF_HOME", str(_CACHE / "hf"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_CACHE / "torch_extensions"))
os.environ.setdefault("TRITON_CACHE_DIR", str(_CACHE / "triton"))
os.environ.setdefault("XDG_CACHE_HOME", str(_CACHE / "xdg"))  # the compiled CPU 8-bit kernels (lowmem.kernels.blockwise_cpu)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch defines no Triton kernel)


_SET_HERE = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ  # (kernel tests only)
if _SET_HERE:
    os.environ["TRITON_INTERPRET"] = "1"

try:  # define the kernels now, while TRITON_INTERPRET decides how: a later import (the planner's fake-tensor
    import lowmem.kernels.adamw8bit_step_triton  # noqa: E402,F401  trace pulls in torch parts that reset
    import lowmem.kernels.perturb_triton  # noqa: E402,F401  Triton's interpret knob) would define them
    import lowmem.kernels.quantize_triton  # noqa: E402,F401  compiled, and every interpreted call fails
except ImportError:
    pass
if _SET_HERE:  # calls outside the kernel tests take the C kernels and the references
    del os.environ["TRITON_INTERPRET"]


@pytest.fixture
def triton_interpreter(monkeypatch):
    """The Triton kernels for this test's CPU tensors: in the interpreter they were defined for (without
    CUDA; with a GPU nothing changes: CPU tensors take the C kernels, CUDA ones the compiled kernels)."""
    if _SET_HERE:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _tiny_config(arch: str = "llama", tied: bool = False, layers: int = 2, vocab: int = 128, hidden: int = 32):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab, tie_word_embeddings=tied)
    if arch == "llama":
        return AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256, **common)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                                    bos_token_id=0, eos_token_id=1, **common)
    if arch == "opt":
        return AutoConfig.for_model("opt", hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                                    num_attention_heads=4, max_position_embeddings=256,
                                    word_embed_proj_dim=hidden, **common)
    raise ValueError(arch)


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(arch="llama"|"gpt2"|"opt", tied=False, layers=2, seed=0, dtype=torch.float32)``
    returns a randomly initialised Hugging Face causal LM built from a config (no download)."""
    from transformers import AutoModelForCausalLM

    def make(arch: str = "llama", tied: bool = False, layers: int = 2, seed: int = 0,
             dtype: torch.dtype = torch.float32, vocab: int = 128, hidden: int = 32):
        torch.manual_seed(seed)
        cfg = _tiny_config(arch, tied, layers, vocab, hidden)
        model = AutoModelForCausalLM.from_config(cfg)
        return model.to(dtype)

    return make


@pytest.fixture
def tiny_config():
    """Factory: ``tiny_config(arch, tied=False, layers=2, vocab=128, hidden=32)`` -> the config ``tiny_model`` builds."""
    return _tiny_config


@pytest.fixture
def tiny_batch():
    """Factory: ``tiny_batch(batch=2, seq=16, vocab=128, seed=0)`` -> dict(input_ids, labels)."""

    def make(batch: int = 2, seq: int = 16, vocab: int = 128, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        return {"input_ids": ids, "labels": ids.clone()}

    return make


def _char_tokenizer(bos: bool):
    """A character-level Hugging Face fast tokenizer (ids < 128, fits the tiny models) with an EOS token; with
    ``bos`` its post-processor prepends <s> to every text, as Gemma's or Llama-3's does; without, it adds nothing,
    as SmolLM2's."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + " .,:;!?'\"-\n"))
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, "</s>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def char_tokenizer():
    """A character-level fast tokenizer that prepends <s> to a text (as Gemma's, Llama-3's)."""
    return _char_tokenizer(bos=True)


@pytest.fixture(scope="session")
def char_tokenizer_no_bos():
    """The same tokenizer without a start token (as SmolLM2's)."""
    return _char_tokenizer(bos=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
