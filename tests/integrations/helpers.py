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


HF_TRAINER = "hf_trainer"  # a run of the FSDP2 worker's RUNS.json that is hf_trainer_run, not a recipe


def hf_trainer_run(optimizer: str, output_dir: str, steps: int = 10) -> dict:
    """A ``transformers.Trainer`` (``ZOTrainer`` for a zeroth-order optimizer) with a lowmem optimizer and
    ``LowMemCallback`` on a tiny Llama:
    sharded by :func:`lowmem.shard_for_trainer` with per-process batch 2 when launched by torchrun,
    plain with batch 4 otherwise (the reference). Returns the logged ``losses`` and the last logged
    ``optimizer_state_mb`` (this rank's), also written to ``output_dir/losses.json`` by rank 0."""
    import json

    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer

    import lowmem
    from lowmem.optim.registry import get_spec

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, vocab_size=128, tie_word_embeddings=False))
    sharded = dist.is_torchelastic_launched()
    args = trainer_arguments(output_dir, max_steps=steps, per_device_train_batch_size=2 if sharded else 4)
    if sharded:
        model = lowmem.shard_for_trainer(model, args)
    zeroth_order = get_spec(optimizer).zeroth_order  # then ZOTrainer, with a larger eps than MeZO's (fp32 losses)
    hparams = {"lr": 1e-3, "eps": 0.1} if zeroth_order else {"lr": 1e-2}
    trainer = (lowmem.ZOTrainer if zeroth_order else Trainer)(
        model=model, args=args, train_dataset=TokenDataset(n=4 * steps),
        optimizers=(lowmem.create_optimizer(model, optimizer, **hparams), None), callbacks=[lowmem.LowMemCallback()])
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    result = {"losses": [r["loss"] for r in logs], "optimizer_state_mb": logs[-1]["optimizer_state_mb"]}
    if args.process_index == 0:
        with open(f"{output_dir}/losses.json", "w") as f:
            json.dump(result, f)
    return result
