"""Fixtures for the engine tests: a tiny config-built model, a byte tokenizer and a small local corpus."""

import pytest
import yaml

TINY_MODEL = {
    "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 257,
               "max_position_embeddings": 128},
    "tokenizer": "bytes",
}

WORDS = ("market shares rose as investors cheered the results while the minister said the election "
         "campaign would focus on schools and the film won three awards at the ceremony last night").split()


@pytest.fixture
def corpus(tmp_path):
    """A directory of 30 short .txt documents in two topic folders."""
    root = tmp_path / "corpus"
    for i in range(30):
        topic = root / ("business" if i % 2 else "politics")
        topic.mkdir(parents=True, exist_ok=True)
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(60)]
        (topic / f"{i:03d}.txt").write_text(" ".join(words).capitalize() + ".\n")
    return root


@pytest.fixture
def tiny_recipe(tmp_path, corpus):
    """Factory: ``tiny_recipe(**section_overrides)`` -> path of a recipe YAML on the tiny model."""

    def make(name: str = "recipe.yaml", **sections) -> str:
        tree = {
            "model": dict(TINY_MODEL),
            "data": {"path": str(corpus), "eval_fraction": 0.2},
            "optim": {"name": "adamw", "lr": 1e-3},
            "train": {"steps": 6, "batch_size": 2, "seq_len": 32, "eval_batches": 2, "checkpoint_every": 3,
                      "warmup_steps": 1},
            "output": {"dir": str(tmp_path / "run")},
        }
        for key, value in sections.items():
            tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tree))
        return str(path)

    return make
