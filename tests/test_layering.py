"""The package layout is the architecture: data flows dataset -> prompts -> model -> matching ->
losses -> objective -> trainer, and no module imports one above it (README, Layout). Every import
of the package is checked, the lazy ones inside functions included."""
import ast
from pathlib import Path
from typing import Dict, List, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "mobilesam_se"

# Bottom to top. A module may import its own layer and the ones below it.
LAYERS: List[Tuple[str, ...]] = [
    ("errors", "precision", "transforms", "prompts", "visual", "weights"),  # geometry and plumbing
    ("data",),
    ("models",),
    ("matching",),
    ("losses",),
    ("distill", "prompted"),  # parts of the objective: teachers' terms, the prompted loss
    ("objective",),
    ("inference",),  # the AMG-equivalent generator, reads a trained model
    ("evaluation",),
    ("engine",),
    # Entry points: they assemble the parts.
    ("assembly", "config", "loggers", "segment", "evaluate", "export", "tune",
     "distill.cache", "overrides"),
]


def _layer_of(module: str) -> int:
    """`module` is dotted below the package, e.g. "engine.trainer"; the most specific entry wins."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = i, len(name)
    assert best is not None, f"mobilesam_se.{module} is in no layer of tests/test_layering.py: add it"
    return best


def _imports() -> Dict[str, List[Tuple[str, int]]]:
    found: Dict[str, List[Tuple[str, int]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join(parts)
        if not module:
            continue
        names: List[Tuple[str, int]] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mobilesam_se."):
                names.append((node.module[len("mobilesam_se."):], node.lineno))
            elif isinstance(node, ast.Import):
                names += [(a.name[len("mobilesam_se."):], node.lineno) for a in node.names if a.name.startswith("mobilesam_se.")]
        found[module] = names
    return found


def upward_imports(imports: Dict[str, List[Tuple[str, int]]]) -> List[str]:
    return [f"mobilesam_se/{module.replace('.', '/')} (line {line}) imports mobilesam_se.{target}"
            for module, imported in imports.items() for target, line in imported
            if _layer_of(target) > _layer_of(module)]


def test_no_module_imports_one_above_it():
    upward = upward_imports(_imports())
    assert not upward, "imports that run back up the chain:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import():
    imports = _imports()
    assert len(imports) > 50 and sum(map(len, imports.values())) > 100  # it read the package
    assert _layer_of("engine.trainer") > _layer_of("objective") > _layer_of("losses.everything") > _layer_of("data.base")
    assert upward_imports({"losses.mask": [("engine.trainer", 3)]}) == [
        "mobilesam_se/losses/mask (line 3) imports mobilesam_se.engine.trainer"]
    assert upward_imports({"distill.distiller": [("distill.cache", 9)]})  # the CLI inside distill is above it
    assert not upward_imports({"engine.trainer": [("objective", 1), ("losses.mask", 2)]})
