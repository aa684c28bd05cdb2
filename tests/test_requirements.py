"""Every distribution the shipped code imports is declared in setup.py, where the path that uses it installs.

A newcomer's first command (``make train``) installs ``.[embed]`` only; a package that the test
extra happens to bring along must not be what makes it work. The rule, checked on the source
(``msl_ds/`` and ``launch/``) without importing it:

- an import at module level (which every command runs) needs a distribution of ``install_requires``;
- an import inside a function or an ``ImportError`` guard, or a ``find_spec("name")`` probe (an
  optional path), needs one of ``install_requires`` or of an extra;
- ``RUNTIME`` lists what is needed without being imported by msl_ds (a library's own check).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import runpy
import sys
from pathlib import Path
from unittest import mock

from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SOURCES = ("msl_ds", "launch")
# needed at run time although no module of msl_ds imports it: transformers' DeepSpeed integration
# (HfDeepSpeedConfig, used by every ZeRO-3 model load) checks for it and raises without it
RUNTIME = {"accelerate": "transformers.integrations.HfDeepSpeedConfig"}


def declared(setup_py: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(install_requires, {extra: requirements}) of a setup.py, as canonical distribution names."""
    with mock.patch("setuptools.setup") as setup:
        runpy.run_path(str(setup_py), run_name="__main__")
    kw = setup.call_args.kwargs

    def names(reqs):
        return {canonicalize_name(Requirement(r).name) for r in reqs}

    return names(kw.get("install_requires", [])), {k: names(v) for k, v in kw.get("extras_require", {}).items()}


def _guarded(parents: list[ast.AST]) -> bool:
    """Inside a function, or a try whose handlers catch ImportError/ModuleNotFoundError/Exception."""
    for node in parents:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
        if isinstance(node, ast.Try):
            for h in node.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
                if h.type is None or any(
                    getattr(n, "id", "") in ("ImportError", "ModuleNotFoundError", "Exception") for n in names
                ):
                    return True
    return False


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, top-level module, optional) for every absolute import and ``find_spec("...")`` in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str, bool]] = []

    def walk(node: ast.AST, parents: list[ast.AST]) -> None:
        mods: list[str] = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "find_spec"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value.split(".")[0], True))
        for m in mods:
            found.append((node.lineno, m.split(".")[0], _guarded(parents)))
        for child in ast.iter_child_nodes(node):
            walk(child, [*parents, node])

    walk(tree, [])
    return found


def undeclared(root: Path, sources: tuple[str, ...], setup_py: Path, own: set[str]) -> list[str]:
    """Every import under ``root/sources`` whose distribution the setup.py does not declare where needed."""
    core, extras = declared(setup_py)
    optional = core.union(*extras.values())
    dists = md.packages_distributions()
    problems = []
    for src in sources:
        for path in sorted((root / src).rglob("*.py")):
            for line, mod, lazy in imports(path):
                if mod in sys.stdlib_module_names or mod in own or mod == "__future__":
                    continue
                # a module that is not installed here is taken to be its own distribution's name
                names = {canonicalize_name(d) for d in dists.get(mod, [mod])}
                allowed = optional if lazy else core
                if not names & allowed:
                    where = "an extra or install_requires" if lazy else "install_requires (imported at module level)"
                    problems.append(
                        f"{path.relative_to(root)}:{line}: imports {mod} ({'/'.join(sorted(names))}), not in {where}"
                    )
    return problems


def test_every_import_is_declared():
    assert undeclared(REPO, SOURCES, REPO / "setup.py", own={"msl_ds"}) == []


def test_runtime_requirements_are_installed_by_default():
    core, _ = declared(REPO / "setup.py")
    for dist, why in RUNTIME.items():
        assert canonicalize_name(dist) in core, f"{dist} (needed by {why}) must be in install_requires"


def test_an_undeclared_import_is_caught(tmp_path):
    """The check fails on the mistakes it exists for: a module-level import of an extra's package,
    a package declared nowhere, and a lazy import of a package declared nowhere."""
    (tmp_path / "setup.py").write_text(
        "from setuptools import setup\n"
        "setup(name='p', install_requires=['numpy>=2'], extras_require={'plots': ['matplotlib']})\n"
    )
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "ok.py").write_text(
        "import os\nimport numpy\nfrom p import ok\n\ndef plot():\n    import matplotlib.pyplot\n"
    )
    assert undeclared(tmp_path, ("p",), tmp_path / "setup.py", own={"p"}) == []
    (pkg / "bad.py").write_text(
        "import matplotlib\nimport yaml\n\ndef f():\n    import wandb\n\n"
        "try:\n    import tqdm\nexcept ImportError:\n    tqdm = None\n"
        "import importlib.util\nimportlib.util.find_spec('mpi4py')\n"
    )
    problems = undeclared(tmp_path, ("p",), tmp_path / "setup.py", own={"p"})
    assert [p.split(": imports ")[1].split(" ")[0] for p in problems] == [
        "matplotlib",
        "yaml",
        "wandb",
        "tqdm",
        "mpi4py",
    ]
    assert problems[0].startswith("p/bad.py:1:") and "install_requires (imported at module level)" in problems[0]
    assert "pyyaml" in problems[1]  # named by its distribution, not its module
