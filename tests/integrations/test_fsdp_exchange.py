"""What each optimizer's step sends under FSDP2 (issue 26), counted, against the README's formulas.

Two gloo processes, 3 steps each, on the tiny model (``fsdp_exchange_worker.py`` counts the payload of
every collective issued inside ``optimizer.step``: an all-gather's whole output, an all-reduce's
tensor). Elementwise rules send nothing; SGD-SaI sends 4 scalars per tensor at its first step, SinkGD
the column sums of squares of each Sinkhorn round, APOLLO(-Mini) its random projection (the smaller
side, ``r max(m, n)`` values) and the norm-growth limiter's sum of squares, GaLore its projection and
the whole gradient at an SVD refresh; FRUGAL its subspace part (a projection as GaLore's, the chosen
columns, rows or entries) and the gradient at an SVD switch; SWAN a tall matrix's column sums, Gram
triangle and norm, and a wide or square one's gradient (``m n b`` gathered, of which a rank receives
``(N-1)/N``), never the weight. The optimizers' ``gathers_gradient`` (what the FSDP2 plan counts) names
exactly the gradients gathered.
"""

import json
import math

from tests.integrations.test_fsdp import OPTIMIZERS, launch

# FRUGAL's orthonormal random subspace steps as the SVD one does (its factor drawn for the whole shape): counted here
OPTIMIZERS = {**OPTIMIZERS, "frugal-random": ({"name": "frugal", "lr": 1e-3,
                                               "args": {"update_proj_gap": 3, "proj_type": "random"}}, 1)}

WORKER = __import__("pathlib").Path(__file__).with_name("fsdp_exchange_worker.py")
FRUGAL = ("frugal-svd", "frugal-random", "frugal-columns", "frugal-rows", "frugal-randk")


def frugal_bytes(shape: list, group: dict) -> int:
    """FRUGAL's fp32 ``down_S(G)`` put together: ``R`` (``std``: the smaller side projected) or the selection."""
    m, n = shape
    kind, rho = group["proj_type"], group["density"]
    if kind in ("svd", "random"):
        return 4 * round(min(m, n) * rho) * max(m, n)
    return 4 * {"columns": m * int(rho * n), "rows": int(rho * m) * n, "randk": int(rho * m * n)}[kind]


def swan_bytes(shape: list, group: dict, whole: bool) -> int:
    """SWAN's: the gradient gathered, or the column sums, the Gram matrix's upper triangle and the norm (fp32)."""
    m, n = shape
    return m * n * group["element_size"] if whole else 4 * ((2 if group["center"] else 1) * n + n * (n + 1) // 2 + 1)


def test_bytes_each_optimizer_sends(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    names = ("adamw8bit", "sgd_sai", "sinkgd", "apollo", "apollo_mini", "galore", *FRUGAL, "swan")
    runs = [[name, tiny_recipe(f"{name}.yaml", optim=OPTIMIZERS[name][0]), ["train.distributed=fsdp2"]]
            for name in names]
    done = launch(runs, tmp_path, worker=WORKER)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(found[name]["replicated_state_agrees"] for name in names), found
    assert found["adamw8bit"]["steps"] == [0, 0, 0]
    # SGD-SaI: each tensor's g-SNR from [sum g, sum g^2, nonzeros] and sum (g - mean)^2 (fp32), first step only
    tensors = sum(len(group["shapes"]) for group in found["sgd_sai"]["groups"])
    assert found["sgd_sai"]["steps"] == [16 * tensors, 0, 0]
    # SinkGD: n fp32 column sums of squares per round and target matrix; its AdamW groups send nothing
    rounds = sum(group["sinkhorn_iters"] * shape[1] * 4 for group in found["sinkgd"]["groups"]
                 if group["sinkhorn_iters"] for shape in group["shapes"])
    assert rounds > 0 and found["sinkgd"]["steps"] == [rounds] * 3
    for name in ("apollo", "apollo_mini"):  # R = u^T G (r x n) or G v^T (m x r) all-reduced, fp32, on the
        projected = sum(4 * group["rank"] * max(shape) + 4 for group in found[name]["groups"]  # smaller side;
                        if group["rank"] for shape in group["shapes"])  # and the limiter's sum of squares
        assert projected > 0 and found[name]["steps"] == [projected] * 3, (name, found[name]["steps"])
    # GaLore (T = 3): the projection as APOLLO's, no limiter; the whole gradient at its SVD refresh (step 1)
    targets = [(shape, group) for group in found["galore"]["groups"] if group["rank"] for shape in group["shapes"]]
    projected = sum(4 * group["rank"] * max(shape) for shape, group in targets)
    gathered = sum(math.prod(shape) * group["element_size"] for shape, group in targets)
    assert found["galore"]["steps"] == [gathered + projected, projected, projected]
    for name in ("adamw8bit", "sgd_sai", "sinkgd", "apollo", "apollo_mini", "galore", *FRUGAL):
        assert not any(any(group["whole"]) for group in found[name]["groups"]), name
    for name in FRUGAL:  # T = 3: an SVD switch at step 1 gathers the gradient
        targets = [(shape, group) for group in found[name]["groups"] if group["density"] for shape in group["shapes"]]
        selected = sum(frugal_bytes(shape, group) for shape, group in targets)
        gathered = sum(math.prod(shape) * group["element_size"] for shape, group in targets) * (name == "frugal-svd")
        assert selected > 0 and found[name]["steps"] == [gathered + selected, selected, selected], name
    # SWAN: tall matrices (the tiny model's gate/up, 64 x 32) by sums over the rows; the others gathered whole
    swan = [(shape, group, whole) for group in found["swan"]["groups"] if group["center"] is not None
            for shape, whole in zip(group["shapes"], group["whole"])]
    assert {whole for shape, _, whole in swan if shape[0] > shape[1]} == {False}
    assert {whole for shape, _, whole in swan if shape[0] <= shape[1]} == {True}
    assert found["swan"]["steps"] == [sum(swan_bytes(*case) for case in swan)] * 3
    # what the FSDP2 plan counts as gathered (gathers_gradient, lowmem.planner.fsdp): the gradients gathered above
    gathered = {"galore": lambda group, whole: bool(group["rank"]), "swan": lambda group, whole: whole,
                "frugal-svd": lambda group, whole: bool(group["density"])}
    for name in names:
        for group in found[name]["groups"]:
            said = gathered.get(name, lambda group, whole: False)
            assert group["gathers"] == [said(group, whole) for whole in group["whole"]], (name, group)
