"""The import graph of llava_uta/ and pretrain/: the layering stated in the README ("Layout"), and no cycle.

Imports are read statically (`ast`) from every module, lazy ones inside functions included: a lazy import is still a
dependency, only a later one, so it obeys the same directions (and a cycle broken only by a lazy import counts).
A package's own `__init__` running before its submodules is not an edge: only the names written in an import are.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llava_uta", "pretrain")

# Bottom first: (layer, its units), each unit a group of modules, given as a module name or as "NAME.**" (a package
# and everything below it); the most specific pattern wins. A module may import modules of its own unit and of the
# units of lower layers, nothing else: two units of one layer stand side by side and do not import each other.
LAYERS = (
    ("base: plain helpers", {"base": (
        "llava_uta", "llava_uta.constants", "llava_uta.conversation", "llava_uta.io_utils", "llava_uta.distributed",
        "llava_uta.preemption", "llava_uta.argparsing")}),
    ("model layer | data", {"model": ("llava_uta.model.**",), "data": ("llava_uta.data.**",)}),
    ("zero-shot evaluation of vision models", {"zero-shot": (
        "llava_uta.eval", "llava_uta.eval.zeroshot", "llava_uta.eval.zeroshot_data", "llava_uta.eval.clip_models")}),
    ("tools: pre-training | LLaVA training | serving",
     {"pretrain": ("pretrain.**",), "train": ("llava_uta.train.**",), "serve": ("llava_uta.serve.**",)}),
    ("benchmarks: the rest of llava_uta.eval", {"benchmarks": ("llava_uta.eval.**",)}),
    ("the one-command pipeline", {"quickstart": ("llava_uta.quickstart.**",)}),
)
UNIT_OF_PATTERN = {pattern: unit for _, units in LAYERS for unit, patterns in units.items() for pattern in patterns}
LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def module_files() -> dict[str, Path]:
    """Every module of the two packages, by dotted name (a package by its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def unit_of(module: str) -> str:
    if module in UNIT_OF_PATTERN:
        return UNIT_OF_PATTERN[module]
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if (pattern := ".".join(parts[:n]) + ".**") in UNIT_OF_PATTERN:
            return UNIT_OF_PATTERN[pattern]
    raise AssertionError(f"{module} is in no layer of tests/test_layering.py: place it there and in the README")


@cache
def imports_of(module: str) -> frozenset[str]:
    """The project modules `module` imports anywhere in its file (`from a import b` is a.b when b is a module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return frozenset(name for name in found if name.split(".")[0] in PACKAGES)


def test_every_import_names_a_module_that_exists():
    missing = {(m, name) for m in MODULES for name in imports_of(m) if name not in MODULES}
    assert not missing, missing


def test_imports_follow_the_layers():
    """Each import goes down the layers, or stays within its unit (siblings in a layer do not import each other)."""
    wrong = []
    for module in MODULES:
        unit = unit_of(module)
        for name in sorted(imports_of(module)):
            target = unit_of(name)
            if target != unit and LAYER_OF[target] >= LAYER_OF[unit]:
                wrong.append(f"{module} ({unit}, layer {LAYER_OF[unit]}) imports {name} ({target}, layer "
                             f"{LAYER_OF[target]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for name in sorted(imports_of(module)):
            if state.get(name) == "open":
                return [*path[path.index(name):], name] if name in path else [module, name]
            if name in MODULES and name not in state and (cycle := visit(name, [*path, name])):
                return cycle
        state[module] = "done"
        return None

    for module in MODULES:
        if module not in state:
            cycle = visit(module, [module])
            assert cycle is None, " -> ".join(cycle)


def test_the_layers_name_only_existing_modules():
    stale = [p for p in UNIT_OF_PATTERN if p.removesuffix(".**") not in MODULES]
    assert not stale, stale


def _fresh_imports(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["llava_uta", "llava_uta.constants", "llava_uta.conversation", "llava_uta.io_utils"])
def test_base_modules_import_without_torch(module):
    """Plain strings and file helpers (the chat templates, the image token) need no torch, timm or transformers."""
    loaded = _fresh_imports(f"import {module}")
    assert not loaded & {"torch", "timm", "transformers", "open_clip", "numpy"}, sorted(loaded)


def test_serving_imports_no_training_code():
    """The serving loader needs the model layer only: no trainer, dataset, pre-training, peft or DeepSpeed."""
    loaded = _fresh_imports("import llava_uta.serve.loader, llava_uta.serve.chat")
    training = {m for m in loaded if m.startswith(("llava_uta.train", "llava_uta.data.llava_dataset", "pretrain"))}
    assert not training and not loaded & {"peft", "deepspeed"}, sorted(training | (loaded & {"peft", "deepspeed"}))


def test_importing_the_model_layer_registers_the_tower():
    """`import llava_uta.model` registers the tower with transformers and the configs with timm (and nothing less)."""
    code = ("import llava_uta.model, timm; from transformers import AutoConfig; "
            "assert type(AutoConfig.for_model('uta_vision')).__name__ == 'UTAVisionConfig'; "
            "assert timm.is_model('uta_b16_224')")
    _fresh_imports(code)
