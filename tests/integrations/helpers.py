"""Helpers of the integration tests (imported by tests and by the worker scripts)."""

import torch
from torch.utils.data import Dataset


class TokenDataset(Dataset):
    """``n`` random sequences as {input_ids, labels} dicts (the Trainer's default collator stacks them)."""

    def __init__(self, n: int = 16, seq: int = 16, vocab: int = 128, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def trainer_arguments(output_dir: str, **overrides):
    """CPU ``TrainingArguments`` for the tests: log every step, constant LR, no reports, no saves."""
    from transformers import TrainingArguments

    kwargs = dict(output_dir=output_dir, use_cpu=True, report_to="none", max_steps=6, per_device_train_batch_size=4,
                  logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, lr_scheduler_type="constant",
                  dataloader_num_workers=0)
    return TrainingArguments(**{**kwargs, **overrides})
