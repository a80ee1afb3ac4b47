"""Packed LM rows start as the tokenizer starts a text (issue 14): its BOS where it adds one, nothing where not."""

import pytest
import torch

from lowmem.data import Document, pack_tokens
from lowmem.models import ByteTokenizer, text_start_ids
from lowmem.objectives import CandidateCollator

DOCS = [Document(text, None) for text in ("First article about markets.", "Second: the match ended 2-1.",
                                          "A third, much longer text that spans several rows of the packing." * 2,
                                          "Four.", "Fifth and last document here.")]


def _stream(tokenizer, start):
    ids = tokenizer([d.text for d in DOCS], add_special_tokens=False)["input_ids"]
    return [t for doc in ids for t in (*start, *doc, tokenizer.eos_token_id)]


def test_start_tokens_are_read_from_the_tokenizer(char_tokenizer, char_tokenizer_no_bos):
    assert text_start_ids(char_tokenizer) == [char_tokenizer.bos_token_id]
    assert text_start_ids(char_tokenizer_no_bos) == []
    assert text_start_ids(ByteTokenizer()) == []


@pytest.mark.parametrize("seq_len", [7, 16, 33])
def test_without_a_start_token_rows_are_the_plain_stream(char_tokenizer_no_bos, seq_len):
    rows = pack_tokens(DOCS, char_tokenizer_no_bos, seq_len, "data.path")
    stream = _stream(char_tokenizer_no_bos, [])
    assert rows.shape == (len(stream) // seq_len, seq_len)
    assert rows.flatten().tolist() == stream[: rows.numel()]


@pytest.mark.parametrize("seq_len", [7, 16, 33])
def test_with_bos_every_row_and_every_document_opens_with_it(char_tokenizer, seq_len):
    bos, eos = char_tokenizer.bos_token_id, char_tokenizer.eos_token_id
    rows = pack_tokens(DOCS, char_tokenizer, seq_len, "data.path")
    assert rows.shape[1] == seq_len and (rows[:, 0] == bos).all()
    assert not (rows[:, 1] == bos).any()  # a row opened by a document keeps one BOS, not two
    for row in rows.tolist():  # inside a row, every document boundary is EOS then BOS
        for i in range(len(row) - 1):
            assert (row[i] == eos) == (row[i + 1] == bos)
    # nothing is lost or reordered: without the BOS added at row starts the rows are the stream itself
    stream = _stream(char_tokenizer, [bos])
    pos = 0
    for row in rows.tolist():
        body = row if stream[pos] == bos else row[1:]
        assert body == stream[pos:pos + len(body)]
        pos += len(body)
    assert len(stream) - pos < seq_len  # only a tail shorter than one row is dropped


def test_bos_rows_score_like_the_tokenizers_own_encoding(char_tokenizer, tiny_model):
    """The first row of a document is exactly what ``tokenizer(text)`` gives, so the model's loss on it is the
    loss on the document as the tokenizer encodes it."""
    model = tiny_model().eval()
    rows = pack_tokens(DOCS[:1], char_tokenizer, 12, "data.path")
    own = char_tokenizer(DOCS[0].text, add_special_tokens=True)["input_ids"][:12]
    assert rows[0].tolist() == own
    with torch.no_grad():
        packed = model(input_ids=rows[:1], labels=rows[:1]).loss
        direct = model(input_ids=torch.tensor([own]), labels=torch.tensor([own])).loss
    assert packed.item() == direct.item()


@pytest.mark.parametrize("bos", [True, False])
def test_classification_prompts_start_as_a_text(char_tokenizer, char_tokenizer_no_bos, bos):
    tokenizer = char_tokenizer if bos else char_tokenizer_no_bos
    prompt = CandidateCollator(tokenizer, [" a", " b"], max_length=64).prompt_ids("Some text")
    assert prompt[: 1] == ([tokenizer.bos_token_id] if bos else tokenizer("S", add_special_tokens=False)["input_ids"])
