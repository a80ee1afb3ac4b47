"""Imports point down (issue 28, DESIGN.md §5): the module graph of lowmem, ``kernels/`` and ``offload/``,
function-local imports included, follows a layer order and has no cycle.

An AST walk, no import: every ``import``/``from ... import`` anywhere in a module (inside functions
too; only ``if TYPE_CHECKING:`` blocks are left out, they never run) is an edge to the lowmem module
it names. Within a layer a module may import another of the same layer, as long as no cycle forms.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# lowest first; a module belongs to the first layer whose prefix it starts with
LAYERS = [
    ("kernels", ["lowmem.kernels"]),
    ("foundations", ["lowmem.dtypes", "lowmem.settings", "lowmem.memory", "lowmem.structure"]),
    ("optimizers, models, data", ["lowmem.optim", "lowmem.activations", "lowmem.models", "lowmem.data",
                                  "lowmem.objectives", "lowmem.state_encoding", "lowmem.block_source", "lowmem.block_loading", "lowmem.checkpoint",
                                  "lowmem.run_dir", "lowmem.sft",
                                  "lowmem.fsdp", "lowmem.fsdp_checkpoint", "lowmem.int8_weights",
                                  "lowmem.quantized_base", "lowmem.safetensors_stream", "lowmem.model_save",
                                  "lowmem.adapter_save"]),
    ("offload", ["lowmem.offload"]),
    ("steps", ["lowmem.steps"]),
    ("recipe", ["lowmem.recipe"]),
    ("composition", ["lowmem.build", "lowmem.trainer", "lowmem.integrations"]),
    ("planner", ["lowmem.planner"]),
    ("commands", ["lowmem.cli", "lowmem.tools", "lowmem"]),
]

# a reference kernel loads its Triton launcher (an optional dependency, DESIGN §3 rule 5) only when
# Triton runs; the launcher imports the reference's constants
OPTIONAL = {("lowmem.kernels.quantize", "lowmem.kernels.quantize_triton"),
            ("lowmem.kernels.perturb", "lowmem.kernels.perturb_triton"),
            ("lowmem.kernels.adamw8bit_step", "lowmem.kernels.adamw8bit_step_triton")}


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("lowmem", "kernels", "offload"):
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if top == "lowmem" and rel.parts[1] in ("kernels", "offload"):
                continue  # the links to the top-level folders
            parts = (["lowmem"] if top != "lowmem" else []) + list(rel.with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


@functools.lru_cache(maxsize=None)  # one walk for the three tests
def _graph() -> dict[str, frozenset[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [s for s in subs if s in modules]  # submodules by name; other names: the module
                targets += [resolve(node.module)] if len(targets) < len(subs) else []
            else:
                continue
            edges |= {t for t in targets if t and t != name and t.startswith("lowmem")}
        graph[name] = frozenset(edges)
    return graph


def _layer(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module}: in no layer of tests/engine/test_layers.py")


def test_imports_point_down():
    graph = _graph()
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
              for a, targets in graph.items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = {a: {b for b in targets if (a, b) not in OPTIONAL} for a, targets in _graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_walk_sees_function_local_imports():
    graph = _graph()  # cli imports the planner inside a function only
    assert "lowmem.planner" in graph["lowmem.cli"] and "lowmem.optim.registry" in graph["lowmem.recipe"]
