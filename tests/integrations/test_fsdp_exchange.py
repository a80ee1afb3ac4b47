"""What each optimizer's step sends under FSDP2 (issue 26), counted, against the README's formulas.

Two gloo processes, 3 steps each, on the tiny model (``fsdp_exchange_worker.py`` counts the payload of
every collective issued inside ``optimizer.step``: an all-gather's whole output, an all-reduce's
tensor). Elementwise rules send nothing; a matrix stepped whole all-gathers its gradient alone
(``m n b`` gathered, of which a rank receives ``(N-1)/N``), never its weight.
"""

import json
import math

from tests.integrations.test_fsdp import OPTIMIZERS, launch

WORKER = __import__("pathlib").Path(__file__).with_name("fsdp_exchange_worker.py")
WHOLE = ("galore", "apollo", "apollo_mini", "frugal-svd", "sinkgd", "swan")  # the gradient gathered every step


def test_bytes_each_optimizer_sends(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    names = ("adamw8bit", *WHOLE)
    runs = [[name, tiny_recipe(f"{name}.yaml", optim=OPTIMIZERS[name][0]), ["train.distributed=fsdp2"]]
            for name in names]
    done = launch(runs, tmp_path, worker=WORKER)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["adamw8bit"]["steps"] == [0, 0, 0] and not found["adamw8bit"]["whole"]
    for name in WHOLE:
        gathered = sum(math.prod(shape) * size for shape, size in found[name]["whole"])
        assert gathered > 0 and found[name]["steps"] == [gathered] * 3, (name, found[name])
