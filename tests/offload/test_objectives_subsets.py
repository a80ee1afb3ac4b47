"""ZO2 for every objective and subset: candidate classification (MeZO's own use case) and a
``model.trainable`` glob through the engine equal in-memory MeZO bit for bit, as do the noise kinds."""

import pytest
import torch

from lowmem.models import keep_trainable
from lowmem.objectives import classification_loss
from lowmem.offload.engine import ZO2Engine
from lowmem.offload.objective import DualCall
from lowmem.optim import create_optimizer
from tests.offload.helpers import HP, assert_same_weights, batches, engine, ref_step, reference


def cls_batches(n: int, examples: int = 2, candidates: int = 3, seq: int = 10, option: int = 2,
                vocab: int = 128, seed: int = 0) -> list[dict]:
    """Batches in CandidateCollator's format: left-padded prompt+candidate rows, option tokens at the end."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = examples * candidates
        ids = torch.randint(1, vocab, (rows, seq), generator=gen)
        lengths = torch.randint(option + 3, seq + 1, (rows,), generator=gen)
        mask = (torch.arange(seq) >= seq - lengths.unsqueeze(1)).long()
        option_mask = torch.zeros(rows, seq, dtype=torch.bool)
        option_mask[:, seq - option:] = True
        out.append({"input_ids": ids * mask, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
                    "option_mask": option_mask, "labels": torch.randint(0, candidates, (examples,), generator=gen)})
    return out


def cls_loss(model, batch):
    return classification_loss(model, batch)[0]


def _pair(tiny_model, trainable=None, hp=None, config=None, loss_fn=None, **model_kw):
    """(reference model, its MeZO, engine) on the same weights, ``trainable`` globs applied to both."""
    ref = tiny_model(**model_kw).eval()
    model = tiny_model(**model_kw)
    if trainable:
        keep_trainable(ref, trainable)
        keep_trainable(model, trainable)
    hp = {**HP, **(hp or {})}
    ref_opt = create_optimizer(ref, "mezo", **hp)
    eng = ZO2Engine(model, create_optimizer(model, "mezo", **hp), config or {}, device="cpu",
                    loss_fn=loss_fn)
    return ref, ref_opt, eng


def _run(ref, ref_opt, eng, data, loss_fn) -> None:
    for k, batch in enumerate(data):
        expected = ref_opt.step(lambda: loss_fn(ref, batch))
        got = eng.step(batch)
        assert torch.equal(expected, got), f"step {k}: loss {got.item()} != {expected.item()}"
        assert eng.optimizer.last_projected_grads == ref_opt.last_projected_grads
    eng.flush()
    assert_same_weights(eng.model_state_dict(), ref)


@pytest.mark.parametrize("model_kw", [dict(arch="llama", tied=False, layers=3), dict(arch="opt", tied=True, layers=2),
                                      dict(arch="gpt2", tied=True, layers=2)], ids=lambda kw: kw["arch"])
def test_classification_is_bit_identical_to_mezo(tiny_model, tmp_path, model_kw):
    ref, ref_opt, eng = _pair(tiny_model, loss_fn=cls_loss, config=dict(nvme_dir=str(tmp_path),
                                                                        host_memory_budget_gb=0.0), **model_kw)
    data = cls_batches(4)
    _run(ref, ref_opt, eng, data, cls_loss)
    # evaluation through the engine: the metrics of the in-memory model
    got, want = eng.evaluate(classification_loss, data[0]), classification_loss(ref, data[0])
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("globs", [["*norm*"], ["*layers.1.*", "*embed_tokens*"]], ids=["norms", "block1+embed"])
def test_trainable_subset_is_bit_identical_to_mezo(tiny_model, globs):
    ref, ref_opt, eng = _pair(tiny_model, trainable=globs, arch="llama", tied=False, layers=3)
    frozen = {n: p.detach().clone() for n, p in ref.named_parameters() if not p.requires_grad}
    assert frozen and len(frozen) < len(list(ref.parameters()))
    _run(ref, ref_opt, eng, batches(4), lambda m, b: m(**b).loss)
    state = eng.model_state_dict()
    assert all(torch.equal(state[n], t) for n, t in frozen.items())  # frozen weights never move


def test_classification_on_a_subset(tiny_model):
    ref, ref_opt, eng = _pair(tiny_model, trainable=["*norm*"], loss_fn=cls_loss, arch="opt", tied=True, layers=2)
    _run(ref, ref_opt, eng, cls_batches(3, seed=4), cls_loss)


@pytest.mark.parametrize("noise", ["rademacher", "table", "philox"])
def test_noise_kinds_are_bit_identical_to_mezo(tiny_model, noise):
    ref, ref_opt = reference(tiny_model, hp=dict(noise=noise), arch="llama", tied=True, layers=3)
    _, eng = engine(tiny_model, hp=dict(noise=noise), arch="llama", tied=True, layers=3)
    for batch in batches(3):
        assert torch.equal(ref_step(ref, ref_opt, batch), eng.step(batch))
    eng.flush()
    assert_same_weights(eng.model_state_dict(), ref)


def test_dual_call_refuses_labels_and_extra_calls(tiny_model):
    model = tiny_model(arch="llama", layers=1).eval()
    batch = batches(1)[0]
    with pytest.raises(ValueError, match="data.task"):
        DualCall(model, 2).branch(0)(**batch)
    dual = DualCall(model, 2)
    with pytest.raises(ValueError, match="once per loss"):
        dual.branch(1)(input_ids=batch["input_ids"])  # the - branch before the + branch
