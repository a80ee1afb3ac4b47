"""Row gradients for a tied embedding (lowmem.steps.tied_lookup): the gradients equal the dense
lookup's bit for bit (duplicate ids, padding_idx, accumulation), the lookup's own gradient is the
batch's rows only, layer-wise mode with it equals normal mode bit for bit, and what is not a plain
tied nn.Embedding is left alone."""

import copy

import pytest
import torch

from lowmem import create_optimizer
from lowmem.steps.layerwise import LayerwiseOptimizer
from lowmem.steps.tied_lookup import install_row_gradients, tied_pair


def _tied_llama(pad_token_id=3, tied=True):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                               tie_word_embeddings=tied, pad_token_id=pad_token_id)
    return AutoModelForCausalLM.from_config(cfg)


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (2, 40), generator=gen)  # 80 tokens on 20 rows: many duplicates
    ids[0, :5] = 3  # padding_idx: no gradient from these tokens
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize("pad_token_id", [3, None])
def test_gradients_equal_the_dense_lookup_bit_for_bit(pad_token_id):
    dense = _tied_llama(pad_token_id)
    rows = copy.deepcopy(dense)
    assert install_row_gradients(rows) is not None
    for seed in (0, 1):  # two micro-batches: accumulation into .grad as well
        for model in (dense, rows):
            model(**_batch(seed)).loss.backward()
    for (name, a), b in zip(dense.named_parameters(), rows.parameters()):
        assert not b.grad.is_sparse and torch.equal(a.grad, b.grad), name


def test_the_lookup_gradient_is_the_batch_rows():
    """Alone (no head in the loss) the lookup's gradient is sparse with one entry per token, and
    its dense form is the dense lookup's gradient."""
    model = _tied_llama()
    emb = model.get_input_embeddings()
    ids = _batch(0)["input_ids"]
    weight = torch.randn(2, 40, 32)
    (emb(ids) * weight).sum().backward()
    dense_grad = emb.weight.grad.clone()
    emb.weight.grad = None
    install_row_gradients(model)
    (emb(ids) * weight).sum().backward()
    grad = emb.weight.grad
    assert grad.is_sparse and grad._nnz() == ids.numel()
    assert torch.equal(grad.to_dense(), dense_grad)


@pytest.mark.parametrize("name", ["adamw", "sinkgd", "swan"])
@pytest.mark.parametrize("accum", [1, 2])
def test_layerwise_with_row_gradients_equals_normal_mode_bit_for_bit(name, accum):
    normal_model = _tied_llama()
    lw_model = copy.deepcopy(normal_model)
    normal = create_optimizer(normal_model, name, lr=1e-2)
    lw = LayerwiseOptimizer(create_optimizer(lw_model, name, lr=1e-2), grad_accum_steps=accum, model=lw_model)
    assert lw._undo_lookup is not None
    for step in range(3):
        for model, opt in ((normal_model, normal), (lw_model, lw)):
            for micro in range(accum):
                (model(**_batch(10 * step + micro)).loss / accum).backward()
            opt.step()
            opt.zero_grad()
    for (n, a), b in zip(normal_model.named_parameters(), lw_model.parameters()):
        assert torch.equal(a, b), n


def test_head_unused_gives_a_dense_gradient_in_layerwise_mode():
    """A loss that never reaches the head leaves only the sparse rows: the hook densifies them."""
    model = _tied_llama()
    reference = copy.deepcopy(model)
    lw = LayerwiseOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=1.0)
    ids = _batch(0)["input_ids"]
    for m in (model, reference):
        m.model(input_ids=ids).last_hidden_state.square().mean().backward()
    lw.step()
    ref_opt.step()
    for (n, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(a, b), n


def test_left_alone_untied_scaled_or_removed():
    assert tied_pair(_tied_llama(tied=False)) is None and install_row_gradients(_tied_llama(tied=False)) is None

    class Scaled(torch.nn.Embedding):  # e.g. Gemma's scaled embedding: its own forward is kept
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model = _tied_llama()
    emb = model.get_input_embeddings()
    emb.__class__ = Scaled
    assert tied_pair(model) is None
    emb.__class__ = torch.nn.Embedding
    emb.scale_grad_by_freq = True
    assert tied_pair(model) is None
    emb.scale_grad_by_freq = False
    lw = LayerwiseOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    head = model.get_output_embeddings()
    assert "forward" in emb.__dict__ and "forward" in head.__dict__
    lw.remove()
    assert "forward" not in emb.__dict__ and "forward" not in head.__dict__


def test_one_dense_gradient_at_the_end_of_backward():
    """The tensor that becomes ``.grad`` is the head's own ``mm`` result: the rows were added into
    it in place (no second dense (V, H) gradient, no sum)."""
    model = _tied_llama()
    install_row_gradients(model)
    made = []
    w = model.get_output_embeddings().weight
    w.register_hook(lambda g: made.append(g.data_ptr()))  # the gradient the engine hands to AccumulateGrad
    model(**_batch(0)).loss.backward()
    assert made == [w.grad.data_ptr()]


def test_head_without_lookup_still_reaches_grad():
    """Backward through the head alone (inputs_embeds): the handed-over gradient is flushed into .grad."""
    dense = _tied_llama()
    rows = copy.deepcopy(dense)
    install_row_gradients(rows)
    ids = _batch(0)["input_ids"]
    for model in (dense, rows):
        embeds = model.get_input_embeddings().weight.detach()[ids]
        model(inputs_embeds=embeds, labels=ids).loss.backward()
    assert torch.equal(dense.get_input_embeddings().weight.grad, rows.get_input_embeddings().weight.grad)


def test_chunked_loss_gradients_equal_the_dense_path():
    from lowmem.objectives import causal_lm_loss

    dense = _tied_llama()
    rows = copy.deepcopy(dense)
    install_row_gradients(rows)
    for model in (dense, rows):
        causal_lm_loss(model, _batch(0), chunk_tokens=16).backward()
    for (name, a), b in zip(dense.named_parameters(), rows.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8, msg=name)
