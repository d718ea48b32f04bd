"""The package's layout, read from its source with ast: no import cycle, no stage that imports another
stage (predict composes preprocess and test on purpose), nets/ kept out of caffe/, modules under 500
lines."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "emotiw"
MAX_LINES = 500
COMPOSERS = {"emotiw.stages.predict": {"emotiw.stages.preprocess", "emotiw.stages.test"}}


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules():
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path, name, known):
    """The emotiw modules `path` imports, at module level or inside functions: `from a.b import c`
    counts as a.b.c when that is a module, else as a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name}


def graph():
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def stage_of(module):
    parts = module.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["emotiw", "stages"] and len(parts) > 2 else None


def test_no_import_cycle():
    edges = graph()
    state = {}  # module -> "open" while on the stack, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_no_stage_imports_another_stage():
    wrong = []
    for module, targets in graph().items():
        stage = stage_of(module)
        if stage is None:
            continue
        for target in targets:
            other = stage_of(target)
            if other is not None and other != stage and other not in COMPOSERS.get(stage, ()):
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_caffe_does_not_import_nets():
    wrong = [f"{module} imports {target}" for module, targets in graph().items() if module.startswith("emotiw.caffe")
             for target in targets if target == "emotiw.nets" or target.startswith("emotiw.nets.")]
    assert not wrong, wrong


def test_modules_stay_under_the_limit():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: lines for name, lines in long.items() if lines > MAX_LINES} == {}


def test_the_checker_sees_a_cycle_and_a_stage_import(tmp_path):
    """The rules above can fail: a two-module cycle and a stage importing a stage are found."""
    known = {"emotiw.stages.a": None, "emotiw.stages.b": None}
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from emotiw.stages import b\n")
    b.write_text("def f():\n    from emotiw.stages.a import thing\n")
    assert imports(a, "emotiw.stages.a", known) == {"emotiw.stages.b"}
    assert imports(b, "emotiw.stages.b", known) == {"emotiw.stages.a"}
    assert stage_of("emotiw.stages.preprocess.clip") == "emotiw.stages.preprocess"
