"""The package's shape: no import cycles, no reaching into another package's private names,
no module named like a standard-library one, and one meaning for --weights."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from featcache.backbones.weights import WeightsRef
from featcache.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "featcache"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(imported module, imported names) for every import in the file, top level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub, []) if sub in modules else (base, [alias.name])


def _graph():
    modules = _modules()
    graph = {m: set() for m in modules}
    private = []
    for name, path in modules.items():
        for target, names in _imports(name, path, modules):
            if target not in modules or target == name:
                continue
            graph[name].add(target)
            home = target.split(".")[:2]
            if home != name.split(".")[:2]:  # another package (or top-level module) than the importer's
                hidden = [p for p in target.split(".")[1:] if p.startswith("_") and p != "__init__"]
                hidden += [n for n in names if n.startswith("_") and not n.startswith("__")]
                private += [f"{name} imports {target}: {', '.join(hidden)}"] if hidden else []
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return result


def test_the_package_has_no_import_cycle():
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    # The same walk over a package whose two modules import each other, one of them inside a function.
    assert _cycles({"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a"}}) == [["p.a", "p.b"]]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from featcache.decode import cpu\n")
    assert ("featcache.decode.cpu", []) in list(_imports("featcache.x", source, _modules()))


def test_no_module_imports_another_packages_private_names():
    _, private = _graph()
    assert private == []


def test_no_module_is_named_like_a_standard_library_module():
    clashes = [name for name in _modules() if name.rpartition(".")[2] in sys.stdlib_module_names]
    assert clashes == []


def test_every_package_says_what_it_offers():
    silent = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("__init__.py")
              if len((ast.get_docstring(ast.parse(p.read_text())) or "").split()) < 8]
    assert silent == []


@pytest.mark.parametrize("text, kind, seed, cli", [
    ("imagenet", "pretrained", 0, "imagenet"), ("pretrained", "pretrained", 0, "imagenet"),
    ("none", "none", 5, "none"), ("none:seed=3", "none", 3, "none"), ("w/my.pt", "file", 5, "w/my.pt"),
])
def test_a_weights_value_means_one_thing(text, kind, seed, cli):
    ref = WeightsRef.parse(text, seed=5 if kind != "pretrained" else 0)
    assert (ref.kind, ref.seed, ref.cli_value) == (kind, seed, cli)


def test_weights_ids_read_back_to_the_same_reference():
    for ref in (WeightsRef("none", seed=7), WeightsRef("pretrained", tag="ResNet18_Weights.IMAGENET1K_V1"),
                WeightsRef("file", sha256="ab" * 32), WeightsRef("pretrained", library="timm", tag="vit.dino")):
        assert WeightsRef.from_id(ref.to_id()).to_id() == ref.to_id()
    assert WeightsRef.from_id("none:seed=7").words() == "random init (seed 7)"
    assert WeightsRef.from_id("torchvision:ResNet18_Weights.IMAGENET1K_V1").words() == \
        "ImageNet (ResNet18_Weights.IMAGENET1K_V1)"
    assert WeightsRef.from_id("file:sha256=" + "ab" * 32, source="/w/x.pt").cli_value == "/w/x.pt"
    with pytest.raises(UserError):
        WeightsRef.from_id("nonsense")
    with pytest.raises(ValueError):  # an unresolved pretrained reference has no id yet
        WeightsRef.parse("imagenet").to_id()


@pytest.mark.parametrize("command, function, options", [
    ("extract", "featcache.extract:extract", "ExtractOptions"),
    ("fit-head", "featcache.fit:fit_head", "HeadOptions"),
    ("finetune", "featcache.finetune:finetune", "FinetuneOptions"),
])
def test_the_cli_and_the_library_take_defaults_from_one_place(command, function, options):
    import dataclasses
    import importlib
    import inspect

    from featcache import options as options_module
    from featcache.cli import build_parser

    declared = {f.name: f.default for f in dataclasses.fields(getattr(options_module, options))}
    module, _, name = function.partition(":")
    signature = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    library = {k: signature[k].default for k in declared if k in signature}
    assert library == {k: declared[k] for k in library} and len(library) == len(declared)
    args = vars(build_parser().parse_args([command, "--out", "x"]))
    args["n_resamples"], args["progress"] = args.get("bootstrap"), not args.get("no_progress", False)
    cli = {k: args[k] for k in declared if k in args}
    assert cli == {k: declared[k] for k in cli}
    assert len(cli) >= len(declared) - (1 if command == "fit-head" else 0)  # fit-head shows no progress bar
