"""Issue 29: SFT data (chat templates, loss on responses only), packing without cross-document attention."""

import json

import pytest
import torch

from tests.conftest import _char_tokenizer
from lowmem.build import mask_ignores_positions
from lowmem.data import (Document, block_diagonal_mask, document_positions, lm_rows, pack_examples, pack_tokens,
                         pad_examples)
from lowmem.models import ByteTokenizer
from lowmem.objectives import IGNORE_INDEX, causal_lm_loss
from lowmem.recipe import SftSection
from lowmem.sft import RecordError, SftEncoder, sft_examples

# SmolLM2-135M-Instruct's chat template, as its GGUF carries it (tokenizer.chat_template)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure."}]


def _configs():
    from transformers import AutoConfig

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    return {
        "llama": AutoConfig.for_model("llama", **common),
        "qwen2": AutoConfig.for_model("qwen2", **common),
        "qwen3": AutoConfig.for_model("qwen3", head_dim=8, **common),
        # a sliding window shorter than the documents: both mask kinds see the packing
        "gemma3": AutoConfig.for_model("gemma3_text", head_dim=8, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention"], **common),
        # OPT's own mask ignores position_ids: the block-diagonal mask is passed explicitly
        "opt": AutoConfig.for_model("opt", vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32),
    }


@pytest.fixture(scope="module")
def smol_chat_tokenizer():
    tok = _char_tokenizer(bos=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


@pytest.mark.parametrize("arch", list(_configs()))
def test_packed_row_loss_is_the_token_weighted_loss_of_its_documents(arch):
    """The outside truth: each document run alone. A packed row (plus padding) must give the token-weighted mean
    of those losses, to fp32 rounding, with the model's loss and the chunked one."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[arch]).eval()
    gen = torch.Generator().manual_seed(1)
    docs = []
    for n in (5, 9, 3, 7):
        x = torch.randint(4, 128, (n,), generator=gen).tolist()
        docs.append((x, [IGNORE_INDEX, IGNORE_INDEX] + x[2:]))  # a two-token "prompt" without loss
    rows = pack_examples(docs, 32, 0, "data.path")
    batch = {k: v for k, v in rows.items() if k != "tokens"}
    assert batch["input_ids"].shape == (1, 32) and rows["tokens"].tolist() == [24]
    assert mask_ignores_positions(model) == (arch == "opt")
    if arch == "opt":
        batch["attention_mask"] = block_diagonal_mask(batch["position_ids"])
    with torch.no_grad():
        alone = [(model(input_ids=torch.tensor([x]), labels=torch.tensor([y])).loss, len(x) - 2) for x, y in docs]
        expected = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
        for chunk in (None, 5):
            torch.testing.assert_close(causal_lm_loss(model, batch, chunk), expected, rtol=2e-6, atol=0)
        if arch != "opt":  # without the restart the documents see each other: the check can fail
            crossed = causal_lm_loss(model, {k: v for k, v in batch.items() if k != "position_ids"})
            assert abs(crossed - expected) > 1e-4


def test_lm_rows_restart_positions_after_each_eos(char_tokenizer_no_bos):
    docs = [Document(t, None) for t in ("abc", "de", "fghijkl", "mn")]
    rows = pack_tokens(docs, char_tokenizer_no_bos, 6, "data.path")  # stream: abc| de| fghijkl| mn|
    out = lm_rows(rows, char_tokenizer_no_bos.eos_token_id)
    # rows: [a b c | d e] [| f g h i j] [k l | m n |]; a row opened inside a document restarts it at 0
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4], [0, 1, 2, 0, 1, 2]]
    first = torch.tensor([[1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(out["labels"] == IGNORE_INDEX, first)  # a document's first token is not a target
    assert document_positions(first).tolist() == out["position_ids"].tolist()


def test_assistant_mask_hand_checked_on_smollm2_template(smol_chat_tokenizer):
    tok = smol_chat_tokenizer
    ids, labels = SftEncoder(tok, SftSection()).encode({"messages": CHAT})
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)  # the template's own text, whole
    trained = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in trained)
    runs, start = [], trained[0]  # contiguous trained spans
    for a, b in zip(trained, trained[1:] + [None]):
        if b != a + 1:
            runs.append(tok.decode(ids[start:a + 1]))
            start = b
    assert runs == ["Hello!<|im_end|>\n", "Sure.<|im_end|>\n"]  # the answers and their end of turn, nothing else
    ids2, labels2 = SftEncoder(tok, SftSection(train_on_prompt=True)).encode({"messages": CHAT})
    assert ids2 == ids and labels2 == ids


def test_pairs_and_alpaca_records(smol_chat_tokenizer, char_tokenizer):
    chat = SftEncoder(smol_chat_tokenizer, SftSection())
    pair = chat.encode({"prompt": "Hi there", "completion": "Hello!"})
    assert pair == chat.encode({"messages": CHAT[:2]})  # a pair is a user turn and an assistant turn
    alpaca = chat.encode({"instruction": "Hi", "input": "there", "output": "Hello!"})
    assert alpaca == chat.encode({"prompt": "Hi\n\nthere", "completion": "Hello!"})
    plain = SftEncoder(char_tokenizer, SftSection(chat_template=False))  # S prompt completion EOS
    ids, labels = plain.encode({"prompt": "Q: 2+2?", "completion": " 4"})
    head = [char_tokenizer.bos_token_id] + char_tokenizer("Q: 2+2?", add_special_tokens=False)["input_ids"]
    tail = char_tokenizer(" 4", add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]
    assert ids == head + tail and labels == [IGNORE_INDEX] * len(head) + tail


def test_padding_per_example_scores_like_packing(tiny_model):
    model = tiny_model().eval()
    examples = [([5, 6, 7, 8, 9], [IGNORE_INDEX, 6, 7, 8, 9]), ([10, 11, 12], [IGNORE_INDEX, IGNORE_INDEX, 12])]
    packed = {k: v for k, v in pack_examples(examples, 16, 0, "x").items() if k != "tokens"}
    padded = pad_examples(examples, 0)
    assert padded["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, packed), causal_lm_loss(model, padded), rtol=2e-6, atol=0)


def _write(path, lines: list[str | bytes]):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


GOOD = json.dumps({"prompt": "Topic of: the match ended 2-1", "completion": " sport"})
BAD_RECORDS = {
    "no fields": (json.dumps({"question": "q", "answer": "a"}), "record 2: none of the fields"),
    "role": (json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
             "record 2: role 'bot'"),
    "empty completion": (json.dumps({"prompt": "p", "completion": "  "}), "record 2: empty completion"),
    "not utf-8": (b'{"prompt": "caf\xe9", "completion": "x"}', "record 2: not UTF-8"),
    "not json": ("{'prompt': 'single quotes'}", "record 2: not valid JSON"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_records_name_the_file_and_record(tmp_path, case):
    line, message = BAD_RECORDS[case]
    path = _write(tmp_path / "data.jsonl", [GOOD, line, GOOD])
    with pytest.raises(RecordError, match=f"^{path}: {message}"):
        sft_examples(str(path), "data.path", ByteTokenizer(), SftSection(), 64)


def test_a_file_that_is_not_json_and_a_refusing_template(tmp_path, smol_chat_tokenizer):
    path = tmp_path / "data.json"
    path.write_text("this is not JSON at all\n")
    with pytest.raises(RecordError, match=f"^{path}: "):
        sft_examples(str(path), "data.path", ByteTokenizer(), SftSection(), 64)
    strict = _char_tokenizer(bos=False)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role "
                            "not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(RecordError, match="the chat template refuses it .System role not supported"):
        SftEncoder(strict, SftSection()).encode({"messages": [{"role": "system", "content": "s"}, *CHAT[:2]]})


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path):
    records = [json.dumps({"prompt": "p" * n, "completion": "c" * 10}) for n in (5, 30, 55)]
    path = _write(tmp_path / "data.jsonl", records)
    examples, counts = sft_examples(str(path), "data.path", ByteTokenizer(), SftSection(chat_template=False), 40)
    # 5+10+1=16 fits; 30+11 loses its EOS (kept, truncated); 55 keeps no answer token (dropped)
    assert [len(x) for x, _ in examples] == [16, 40] and counts == {"records": 3, "truncated": 1, "dropped": 1}
    _, counts = sft_examples(str(path), "data.path", ByteTokenizer(), SftSection(chat_template=False, overlong="drop"), 40)
    assert counts == {"records": 3, "truncated": 0, "dropped": 2}


def test_parquet_and_json_files_read_alike(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    section = SftSection(chat_template=False)
    a, _ = sft_examples(str(tmp_path / "a.parquet"), "data.path", ByteTokenizer(), section, 64)
    b, _ = sft_examples(str(tmp_path / "b.json"), "data.path", ByteTokenizer(), section, 64)
    assert a == b and len(a) == 3


def test_models_are_loaded_without_kv_cache_so_a_plain_call_keeps_documents_apart():
    """transformers ignores packed position_ids when it builds a KV cache (use_cache defaults to True): a model
    lowmem loads has it off, so even ``model(**batch)`` (the HF Trainer's call) keeps the packing."""
    from lowmem.models import load_model
    from lowmem.recipe import ModelSection

    config = {k: v for k, v in _configs()["llama"].to_diff_dict().items() if k != "transformers_version"}
    model = load_model(ModelSection(config=config, tokenizer="bytes")).eval()
    batch = {k: v for k, v in pack_examples([([5, 6, 7], [5, 6, 7]), ([8, 9, 10, 11], [8, 9, 10, 11])], 8, 0,
                                            "x").items() if k != "tokens"}
    with torch.no_grad():
        assert model(**batch).loss.item() == causal_lm_loss(model, batch).item()
        assert model(**batch, use_cache=True).loss.item() != causal_lm_loss(model, batch).item()
