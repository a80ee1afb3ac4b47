"""Objectives against a direct computation: each (prompt + candidate) scored alone, unpadded."""

import pytest
import torch
import torch.nn.functional as F

from lowmem.objectives import CandidateCollator, candidate_scores, causal_lm_loss, classification_loss

VERBALIZERS = [" business", " sport", " tech"]


EXAMPLES = [("Shares fell sharply today.", 0), ("The striker scored twice", 1), ("New chips, faster phones", 2),
            ("A", 1)]


def _direct_scores(model, collator, examples) -> torch.Tensor:
    """Score every candidate alone: no padding, full logits, mean log-prob of its tokens."""
    scores = []
    for text, _ in examples:
        row = []
        for option in collator._options:
            ids = torch.tensor([collator.prompt_ids(text) + option])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            n = len(option)
            positions = torch.arange(ids.shape[1] - n, ids.shape[1])
            row.append(logp[positions - 1, ids[0, positions]].mean())
        scores.append(torch.stack(row))
    return torch.stack(scores)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_classification_matches_direct_per_candidate_computation(tiny_model, char_tokenizer, arch):
    model = tiny_model(arch=arch).eval()
    collator = CandidateCollator(char_tokenizer, VERBALIZERS, template="{text}\nTopic:", max_length=64)
    batch = collator(EXAMPLES)
    assert batch["input_ids"].shape[0] == len(EXAMPLES) * len(VERBALIZERS)
    with torch.no_grad():
        scores = candidate_scores(model, batch)
        direct = _direct_scores(model, collator, EXAMPLES)
        loss, accuracy = classification_loss(model, batch)
    torch.testing.assert_close(scores, direct, rtol=1e-5, atol=1e-5)
    labels = torch.tensor([label for _, label in EXAMPLES])
    torch.testing.assert_close(loss, F.cross_entropy(direct, labels), rtol=1e-5, atol=1e-5)
    assert accuracy.item() == (direct.argmax(-1) == labels).float().mean().item()


def test_left_truncation_keeps_template_and_candidate(char_tokenizer):
    collator = CandidateCollator(char_tokenizer, VERBALIZERS, template="Text: {text}\nTopic:", max_length=40)
    text = "abcdefghijklmnopqrstuvwxyz0123456789" * 3
    batch = collator([(text, 0)])
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert len(row) <= 40
    decoded = char_tokenizer.decode(row, skip_special_tokens=True)
    assert decoded.startswith("Text: ") and decoded.endswith("\nTopic: business")
    kept = decoded[len("Text: "):-len("\nTopic: business")]
    assert text.endswith(kept) and len(kept) == 40 - 1 - len("Text: \nTopic:") - len(" business")
    longest_row = batch["attention_mask"].sum(-1).max().item()
    assert longest_row == 40  # the longest candidate fills max_length exactly
    assert row[0] == char_tokenizer.bos_token_id


def test_batch_format_left_padded_with_option_mask(char_tokenizer):
    collator = CandidateCollator(char_tokenizer, VERBALIZERS, max_length=64)
    batch = collator([{"text": "hi", "label": 2}, {"text": "a longer text", "label": 0}])
    assert batch["labels"].tolist() == [2, 0]
    for i, verbal in enumerate(VERBALIZERS * 2):
        opt = batch["input_ids"][i][batch["option_mask"][i]].tolist()
        assert char_tokenizer.decode(opt) == verbal
        assert batch["option_mask"][i, -1] and batch["attention_mask"][i, -1] == 1
    assert (batch["position_ids"][batch["attention_mask"].bool()] >= 0).all()


def test_causal_lm_loss_is_the_mean_next_token_cross_entropy(tiny_model, tiny_batch):
    model, batch = tiny_model().eval(), tiny_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
        torch.testing.assert_close(causal_lm_loss(model, batch), expected)


def test_bad_arguments(char_tokenizer):
    with pytest.raises(ValueError, match="template"):
        CandidateCollator(char_tokenizer, VERBALIZERS, template="no placeholder")
    with pytest.raises(ValueError, match="max_length"):
        CandidateCollator(char_tokenizer, VERBALIZERS, max_length=10)
    with pytest.raises(ValueError, match="label"):
        CandidateCollator(char_tokenizer, VERBALIZERS)([("x", 5)])


# ---------------------------------------------------------------- chunked next-token loss

def _padded_batch(tiny_batch, padding: bool, vocab: int = 128, batch: int = 2, seq: int = 16):
    """``tiny_batch`` with the last 5 positions of row 0 padded (mask 0, label -100) if ``padding``."""
    out = tiny_batch(batch=batch, seq=seq, vocab=vocab)
    if padding:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        out["attention_mask"][0, -5:] = 0
        out["labels"][0, -5:] = -100
    return out


def _loss_and_grads(model, batch, chunk_tokens=None):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch, chunk_tokens)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads_close(grads, ref_grads, rel=2e-6):
    """Every parameter's gradient within ``rel`` of its largest entry (floor: ``rel`` of the
    largest entry of all, for gradients that are zero up to rounding, e.g. OPT's key bias)."""
    assert grads.keys() == ref_grads.keys()
    scale = max(g.abs().max() for g in ref_grads.values())
    for name, g in grads.items():
        tol = rel * max(ref_grads[name].abs().max(), 1e-3 * scale)
        assert (g - ref_grads[name]).abs().max() <= tol, name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("padding", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("chunk_tokens", [5, 7, 30, 1000])  # 2 x 15 = 30 predicted tokens: 5 and 30 divide it
def test_chunked_loss_equals_the_models_loss_and_gradients(tiny_model, tiny_batch, tied, padding, chunk_tokens):
    model, batch = tiny_model(tied=tied).train(), _padded_batch(tiny_batch, padding)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    loss, grads = _loss_and_grads(model, batch, chunk_tokens)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_chunked_loss_finds_body_and_head_of_other_architectures(tiny_model, tiny_batch, arch):
    model, batch = tiny_model(arch=arch, tied=True).eval(), _padded_batch(tiny_batch, True)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    loss, grads = _loss_and_grads(model, batch, 7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    _assert_grads_close(grads, ref_grads)


def test_chunked_loss_under_no_grad_and_with_model_checkpointing(tiny_model, tiny_batch):
    """A zeroth-order closure calls the loss under no_grad; activation checkpointing of the blocks
    composes with the checkpointed chunks."""
    model, batch = tiny_model().train(), _padded_batch(tiny_batch, True)
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, batch, 4), causal_lm_loss(model, batch), rtol=1e-6, atol=0)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, grads = _loss_and_grads(model, batch, 4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    _assert_grads_close(grads, ref_grads)


def test_chunked_loss_under_bf16_autocast(tiny_model, tiny_batch):
    model, batch = tiny_model().train(), _padded_batch(tiny_batch, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _loss_and_grads(model, batch)
        loss, grads = _loss_and_grads(model, batch, 7)
    assert loss.dtype == ref_loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=0)
    _assert_grads_close(grads, ref_grads, rel=2e-2)


def _saved(model, batch, chunk_tokens):
    """(bytes, shapes) of the tensors autograd saves for backward (each storage once; shapes of
    the tensors that are not views of a parameter, such as the head weight transposed)."""
    seen, shapes = {}, []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        if t.untyped_storage().data_ptr() not in params:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model, batch, chunk_tokens)
    loss.backward()
    return sum(seen.values()), shapes


def test_chunked_loss_saves_no_tokens_by_vocab_tensor(tiny_model, tiny_batch):
    vocab = 4096
    model, batch = tiny_model(vocab=vocab).train(), tiny_batch(batch=2, seq=64, vocab=vocab)
    n = 2 * 63  # predicted tokens
    full_bytes, full_shapes = _saved(model, batch, None)
    chunked_bytes, chunked_shapes = _saved(model, batch, 16)
    assert any(len(s) >= 2 and s[-1] == vocab for s in full_shapes)  # the logits of the model's own loss
    assert not any(s and s[-1] == vocab for s in chunked_shapes)          # recomputed in backward instead
    assert full_bytes - chunked_bytes >= n * vocab * 4, (full_bytes, chunked_bytes)


def test_chunked_loss_refuses_what_it_cannot_reproduce(tiny_model, tiny_batch):
    batch = tiny_batch()
    model = tiny_model()
    model.config.final_logit_softcapping = 30.0  # as Gemma-2: tanh soft-capping after the head
    with pytest.raises(ValueError, match=r"^train.loss_chunk_tokens: .*final_logit_softcapping") as err:
        causal_lm_loss(model, batch, 8)
    assert "\n" not in str(err.value)
    model = tiny_model()
    model.forward = lambda input_ids, attention_mask=None: None  # a forward that cannot skip the logits
    with pytest.raises(ValueError, match=r"^train.loss_chunk_tokens: .*logits_to_keep") as err:
        causal_lm_loss(model, batch, 8)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^train.loss_chunk_tokens: .*decoder") as err:
        causal_lm_loss(torch.nn.Linear(4, 4), batch, 8)
    assert "\n" not in str(err.value)
