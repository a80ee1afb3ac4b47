"""The CUDA schedule (side streams, pinned buffers, events): equal to in-memory MeZO on the same GPU."""

import pytest
import torch

from lowmem.offload.engine import ZO2Engine
from lowmem.optim import create_optimizer
from tests.offload.helpers import HP, assert_same_weights, batches, ref_step


@pytest.mark.gpu
@pytest.mark.parametrize("config,noise", [({}, "gaussian"), ({"prefetch_depth": 2}, "gaussian"),
                                          ({"host_memory_budget_gb": 0.0, "nvme_dir": "NVME"}, "gaussian"),
                                          ({}, "philox")])  # philox: the compiled in-place kernel (issue #17)
def test_cuda_engine_equals_cuda_mezo(tiny_model, tmp_path, config, noise):
    config = {k: str(tmp_path) if v == "NVME" else v for k, v in config.items()}
    hp = {**HP, "noise": noise}
    ref = tiny_model(arch="opt", tied=True, layers=4).cuda().eval()
    ref_opt = create_optimizer(ref, "mezo", **hp)
    model = tiny_model(arch="opt", tied=True, layers=4)
    eng = ZO2Engine(model, create_optimizer(model, "mezo", **hp), config, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for batch in batches(4):
        assert torch.equal(ref_step(ref, ref_opt, {k: v.cuda() for k, v in batch.items()}), eng.step(batch))
    eng.flush()
    assert_same_weights({k: v.cuda() for k, v in eng.model_state_dict().items()}, ref)
    assert all(p.device.type == "cuda" for p in eng.mover.slots)
    assert len(eng.mover.slots) == min(config.get("prefetch_depth", 1) + 2, 4)


@pytest.mark.gpu
def test_cuda_int8_host_copy_host_and_nvme_tiers_identical(tiny_model, tmp_path):
    """offload.host_dtype: int8 on CUDA (dequantized and stochastically rounded on the device, from CUDA
    generators): the host and NVMe tiers store the same bytes and give the same losses; the staging buffers
    hold about half of a bf16 copy's bytes."""
    runs = []
    for config in ({"host_dtype": "int8"}, {"host_dtype": "int8", "host_memory_budget_gb": 0.0,
                                             "nvme_dir": str(tmp_path)}):
        model = tiny_model(arch="opt", tied=True, layers=4)
        eng = ZO2Engine(model, create_optimizer(model, "mezo", **HP), config, device="cuda")
        losses = [eng.step(batch) for batch in batches(4)]
        eng.flush()
        runs.append((losses, [eng.store.get(i) for i in range(4)]))
        assert all(t.device.type == "cuda" and t.dtype == torch.uint8 for t in eng.mover.staging)
        assert eng.store.numels[0] < 0.52 * 2 * eng.packed[0].numel
        eng.close()
    (l1, b1), (l2, b2) = runs
    assert all(torch.equal(a, b) for a, b in zip(l1, l2)) and all(torch.equal(a, b) for a, b in zip(b1, b2))
