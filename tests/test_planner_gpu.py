"""The planner's CUDA prediction against ``torch.cuda.max_memory_allocated`` of the same step on a GPU
(skipped visibly without CUDA; issue #18: the peak-memory table on a GPU compares CUDA with CUDA)."""

import pytest
import torch

from lowmem.tools.measure import measure_step
from lowmem.planner import plan
from tests.test_planner import BEST, make_recipe

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("overrides", [["optim.name=adamw"], BEST, ["optim.name=mezo"]], ids=["adamw", "best", "mezo"])
def test_cuda_plan_within_15_percent_of_cuda_peak(tmp_path, overrides):
    recipe = make_recipe(tmp_path, *overrides)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    measured = measure_step(recipe)["cuda_peak"] - base
    predicted = plan(recipe, "cuda", suggest=False).peak_bytes
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)
