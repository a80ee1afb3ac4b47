"""Objectives against a direct computation: each (prompt + candidate) scored alone, unpadded."""

import string

import pytest
import torch
import torch.nn.functional as F

from lowmem.objectives import CandidateCollator, candidate_scores, causal_lm_loss, classification_loss

VERBALIZERS = [" business", " sport", " tech"]


@pytest.fixture(scope="module")
def char_tokenizer():
    """A character-level fast tokenizer that prepends <s> (ids < 128, fits the tiny models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + " .,:;!?'\"-\n"))
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", unk_token="<unk>")


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
