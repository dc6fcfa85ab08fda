"""The package layout: module-scope imports form no cycle, and each layer imports only the layers below it."""

import ast
from importlib import resources
from pathlib import Path

ROOT = Path(str(resources.files("nanobooth")))

# A layer may import (at module scope) only from itself and the layers listed after it. Imports inside
# functions are how the CLI stays torch-free and are not checked here (test_cli checks what they load).
LAYERS = ["ui", "cli", "demo", "toy", "eval", "interop", "core.train", "core.validation_grid", "inference", "methods", "core", "families", "tiny"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_scope_imports(path: Path) -> set[str]:
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.parse(path.read_text()).body:  # module scope only
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {n for n in names if (ROOT.parent / (n.replace(".", "/") + ".py")).exists()
                    or (ROOT.parent / n.replace(".", "/") / "__init__.py").exists()} or {target}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("nanobooth")}


def graph() -> dict[str, set[str]]:
    return {module_name(p): module_scope_imports(p) for p in ROOT.rglob("*.py")}


def layer(mod: str) -> int:
    rest = mod.removeprefix("nanobooth.")
    matches = [i for i, name in enumerate(LAYERS) if rest == name or rest.startswith(name + ".")]
    return min(matches, key=lambda i: -len(LAYERS[i])) if matches else -1


def test_module_scope_imports_have_no_cycle():
    g = graph()
    # the graph is read correctly (relative imports resolved), so the checks below are not vacuous
    assert {"nanobooth.methods", "nanobooth.core.checkpoint", "nanobooth.core.validation_grid"} <= g["nanobooth.core.train"]
    assert "nanobooth.inference.generate" in g["nanobooth.core.validation_grid"]
    state: dict[str, int] = {}

    def visit(m, stack):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(g.get(m, ())):
            visit(d, stack + [m])
        state[m] = 2

    for m in sorted(g):
        visit(m, [])


def test_each_layer_imports_only_layers_below_it():
    bad = []
    for mod, deps in graph().items():
        if layer(mod) < 0 or mod == "nanobooth":
            continue
        for d in deps:
            if d != "nanobooth" and 0 <= layer(d) < layer(mod):
                bad.append(f"{mod} -> {d}")
    assert not bad, bad


def test_the_layers_exist_as_packages():
    for pkg in ("core", "families", "methods", "inference", "interop", "eval", "toy", "toy/recipes"):
        assert (ROOT / pkg / "__init__.py").exists(), pkg
    # the recipes that built the shipped assets are not imported by the runtime
    runtime = {m: d for m, d in graph().items() if ".recipes" not in m}
    assert not [m for m, d in runtime.items() if any(".toy.recipes" in x for x in d)]


def test_the_public_names_load_lazily_and_are_the_api_functions():
    import subprocess
    import sys

    code = ("import sys, nanobooth; assert 'torch' not in sys.modules, 'import nanobooth loaded torch'; "
            "from nanobooth import events, evaluate, generate, load_config, train, TrainConfig; "
            "import nanobooth.api as api, nanobooth.core.events as ev; "
            "assert (train, generate, evaluate, events) == (api.train, api.generate, api.evaluate, ev); "
            "assert isinstance(load_config('toy/dreambooth'), TrainConfig); "
            "assert sorted(nanobooth.__all__) == sorted(['train', 'generate', 'evaluate', 'events', 'load_config', "
            "'TrainConfig', 'TrainingInterrupted'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-c", "import nanobooth; nanobooth.trian"], capture_output=True, text=True)
    assert "has no attribute 'trian'" in res.stderr
