"""The house's floors: every fastgpt module imports only from its own floor or the ones below.

Read top-down, a floor may use anything beneath it and nothing above it:

    command line          cli, __main__
    train and bench       train, bench/
    package               fastgpt/__init__.py (the public names, re-exported)
    integrations          patch, hf, distributed
    weights               weights
    models                models/
    modules               nn
    ops                   ops (the public functional API)
    backends              backends, triton/ (the registry and the Triton kernels it loads,
                          which ask it what they support: one floor)
    op contract           _registration
    bottom                reference (the oracle), _extension (the loader), tokenizer

Every `import` / `from ... import` statement counts, also those inside functions (lazy
imports are still dependencies). A module that is on no floor fails the test too: a
new module has to be placed deliberately.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "fastgpt"

FLOORS = [  # bottom first; module names (a package stands for everything in it)
    ("bottom", ("fastgpt.reference", "fastgpt._extension", "fastgpt.tokenizer")),
    ("op contract", ("fastgpt._registration",)),
    ("backends", ("fastgpt.backends", "fastgpt.triton")),
    ("ops", ("fastgpt.ops",)),
    ("modules", ("fastgpt.nn",)),
    ("models", ("fastgpt.models",)),
    ("weights", ("fastgpt.weights",)),
    ("integrations", ("fastgpt.patch", "fastgpt.hf", "fastgpt.distributed")),
    ("package", ("fastgpt",)),
    ("train and bench", ("fastgpt.train", "fastgpt.bench")),
    ("command line", ("fastgpt.cli", "fastgpt.__main__")),
]
_FLOOR_OF = {name: level for level, (_, names) in enumerate(FLOORS) for name in names}


def floor_of(module: str) -> int | None:
    """The floor of a dotted module name: its own entry or its nearest package's (the bare
    package `fastgpt` only for fastgpt/__init__.py itself); None when it has none."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        name = ".".join(parts[:end])
        if name in _FLOOR_OF:
            return _FLOOR_OF[name]
    return _FLOOR_OF.get(module)


def modules_under(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} for every .py file of the package."""
    root = package_dir.parent
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def imports_of(module: str, path: Path, is_package: bool, known: set[str], package: str
               ) -> list[tuple[int, str, str]]:
    """(line, imported fastgpt module, statement as written) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module if is_package else module.rpartition(".")[0]  # the package relative imports start from
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    found.append((node.lineno, alias.name, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == package or target.startswith(package + ".")):
                continue
            written = f"from {'.' * node.level}{node.module or ''} import "
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((node.lineno, submodule if submodule in known else target, written + alias.name))
    return found


def upward_imports(package_dir: Path) -> list[str]:
    """One message per import from a higher floor, and per module on no floor."""
    package = package_dir.name
    modules = modules_under(package_dir)
    problems = []
    for module, (path, is_package) in modules.items():
        level = floor_of(module)
        where = path.relative_to(package_dir.parent)
        if level is None:
            problems.append(f"{where}: module {module} is on no floor; add it to FLOORS in tests/test_layers.py")
            continue
        for line, imported, statement in imports_of(module, path, is_package, set(modules), package):
            target = floor_of(imported)
            if target is not None and target > level:
                problems.append(f"{where}:{line}: `{statement}` imports {imported} (floor '{FLOORS[target][0]}') "
                                f"from {module} (floor '{FLOORS[level][0]}'): a module may import only from its "
                                f"own floor or below")
    return problems


def test_no_module_imports_from_a_higher_floor():
    problems = upward_imports(PACKAGE_DIR)
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_every_floor_is_inhabited_as_the_brief_says():
    """The key placements the checks above rely on (a typo in FLOORS would make them vacuous)."""
    modules = modules_under(PACKAGE_DIR)
    for name in ("fastgpt.reference", "fastgpt.ops", "fastgpt.nn", "fastgpt.models", "fastgpt.models.gpt2",
                 "fastgpt.weights", "fastgpt.patch", "fastgpt.train", "fastgpt.cli"):
        assert name in modules, f"{name} is not a module of the package"
    order = [floor_of(name) for name in ("fastgpt.reference", "fastgpt._registration", "fastgpt.backends",
                                         "fastgpt.ops", "fastgpt.nn", "fastgpt.models.gpt2", "fastgpt.weights",
                                         "fastgpt.patch", "fastgpt.train", "fastgpt.cli")]
    assert order == sorted(order) and len(set(order)) == len(order)
    assert floor_of("fastgpt.bench.model") == floor_of("fastgpt.train")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_check_catches_upward_and_unplaced_imports(tmp_path):
    """The checker itself, on a made-up copy of the layout: nn importing models (at module level
    and lazily), ops importing the package's cli, and a module on no floor are all reported."""
    pkg = tmp_path / "fastgpt"
    _write(pkg / "__init__.py", "from . import nn\nfrom .models import GPTModel\n")
    _write(pkg / "ops.py", "import os\n\ndef f():\n    import fastgpt.cli\n")
    _write(pkg / "nn.py", "from . import ops\nfrom .models.gpt2 import GPTModel\n\ndef g():\n    from . import weights\n")
    _write(pkg / "models" / "__init__.py", "from .gpt2 import GPTModel\n")
    _write(pkg / "models" / "gpt2.py", "from ..nn import LayerNorm\nfrom ..backends import check_backend_name\n")
    _write(pkg / "weights.py", "from .models import GPTModel\n")
    _write(pkg / "cli.py", "from .train import main\n")
    _write(pkg / "stray.py", "")
    problems = upward_imports(pkg)
    assert len(problems) == 4, problems
    assert any("fastgpt/nn.py:2: `from .models.gpt2 import GPTModel` imports fastgpt.models.gpt2 (floor 'models') "
               "from fastgpt.nn (floor 'modules')" in p for p in problems), problems
    assert any("fastgpt/nn.py:5: `from . import weights` imports fastgpt.weights" in p for p in problems), problems
    assert any("fastgpt/ops.py:4: `import fastgpt.cli`" in p for p in problems), problems
    assert any("module fastgpt.stray is on no floor" in p for p in problems), problems


# ---- one config registry ---------------------------------------------------------------------

CONFIG_REGISTRY = PACKAGE_DIR / "models" / "configs.py"


def test_named_configs_live_only_in_the_registry():
    """No module but fastgpt/models/configs.py spells out a model config as literal data (a dict
    of constants with emb_dim and n_layers): every named config is looked up with model_config."""
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Dict):
                continue
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            values = [v for k, v in zip(node.keys, node.values) if k is not None]  # k None: a **spread
            if {"emb_dim", "n_layers"} <= keys and all(isinstance(v, ast.Constant) for v in values):
                offenders.append(f"{os.path.relpath(path, PACKAGE_DIR.parent)}:{node.lineno}")
    assert offenders and all(o.startswith(os.path.join("fastgpt", "models", "configs.py")) for o in offenders), \
        f"config dicts outside {CONFIG_REGISTRY.name}: {offenders}"


if __name__ == "__main__":  # python tests/test_layers.py: print the problems
    raise SystemExit(pytest.main([__file__, "-q"]))
