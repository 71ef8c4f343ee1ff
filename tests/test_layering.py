"""Each package imports only the packages below it (docs/architecture.md), checked on every import statement."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lrm_train

PACKAGE_ROOT = Path(lrm_train.__file__).parent

# Bottom to top, as docs/architecture.md draws it; packages on one line do not import each other (eval reads HF
# folders, experiments score with eval).
LAYERS = [["nn"], ["models"], ["data", "optim"], ["distributed"], ["train"], ["hf"], ["eval"], ["experiments"]]
# Beside the layers: every package may import them; they import only utils (which imports none of ours).
STANDALONE = ["utils", "config_compose", "cli"]


def allowed_imports(package: str) -> set[str]:
    if package in STANDALONE:
        return set() if package == "utils" else {"utils"}
    level = next(i for i, layer in enumerate(LAYERS) if package in layer)
    return {name for layer in LAYERS[:level] for name in layer} | set(STANDALONE)


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute name) of everything the file imports (``from a import b``: ``a.b``), function-local and
    relative imports included."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    package = list(parts[:-1])  # what a relative import starts from (for __init__.py too: its folder)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def layering_violations(root: Path = PACKAGE_ROOT) -> list[str]:
    violations = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        package = parts[0] if len(parts) > 1 else path.stem
        if package == "__init__":
            continue
        for line, module in imported_modules(path, root):
            target = module.split(".")
            if target[0] != "lrm_train" or len(target) < 2 or target[1] == package:
                continue
            if target[1] not in allowed_imports(package):
                violations.append(f"{path.relative_to(root.parent)}:{line} ({package}) imports {module}")
    return violations


def test_every_package_imports_only_those_below_it():
    assert layering_violations() == []


def test_every_package_has_a_layer():
    named = {name for layer in LAYERS for name in layer} | set(STANDALONE)
    packages = {p.name for p in PACKAGE_ROOT.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE_ROOT.glob("*.py") if p.name != "__init__.py"}
    assert packages | modules == named


def test_an_upward_import_is_caught_even_inside_a_function(tmp_path):
    root = tmp_path / "lrm_train"
    (root / "train" / "callbacks").mkdir(parents=True)
    (root / "train" / "callbacks" / "late.py").write_text("def f():\n    from lrm_train.eval import api\n")
    (root / "models" / "deep.py").parent.mkdir()
    (root / "models" / "deep.py").write_text("from ..train import loop\nimport lrm_train.nn\n")
    (root / "data").mkdir()
    (root / "data" / "x.py").write_text("from lrm_train import optim\nfrom . import loader\n")
    assert sorted(layering_violations(root)) == [
        "lrm_train/data/x.py:1 (data) imports lrm_train.optim",
        "lrm_train/models/deep.py:1 (models) imports lrm_train.train.loop",
        "lrm_train/train/callbacks/late.py:2 (train) imports lrm_train.eval.api",
    ]


@pytest.mark.multiprocess
def test_a_run_built_without_extras_imports_nothing_above_train():
    """What the import statements cannot show: configs and ``build_callbacks`` attach callbacks by name
    (``_target_``), and the downstream evaluation (eval/, above train/) is attached only when ``eval.tasks`` is set."""
    above = [name for layer in LAYERS[LAYERS.index(["train"]) + 1 :] for name in layer]
    script = (
        "import sys; from lrm_train.train import compose; from lrm_train.train.callbacks import build_callbacks; "
        "build_callbacks(compose([])); "
        f"print(sorted({{m.split('.')[1] for m in sys.modules if m.startswith('lrm_train.')}} & {set(above)!r}))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    with_tasks = script.replace("compose([])", "compose(['eval.tasks=[arc_easy]'])")
    done = subprocess.run([sys.executable, "-c", with_tasks], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "['eval']", done.stderr[-2000:]  # the check itself sees an upward import
