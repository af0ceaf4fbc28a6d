"""The layering's contracts (pyproject.toml, `lint-imports` in .ci/run) can fail: in a copy of the tree,
one forbidden import per contract breaks exactly that contract's promise, and the clean copy keeps them all.

The process-level check (front ends map no framework while they run) is in test_process_split.py.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINT_IMPORTS = pathlib.Path(sys.executable).with_name("lint-imports")
PACKAGES = ("model", "training", "service", "bench")

# contract name -> (module file, a forbidden import added to it)
FORBIDDEN = {
    "model knows nothing of the service, training or the benches": ("model/names.py", "import bench"),
    "front ends import neither the engine nor a deep-learning framework": (
        "service/frontend/state.py",
        "import service.engine.eviction",
    ),
    "the engine imports no front end": ("service/engine/eviction.py", "import service.frontend.audit"),
    "the registry of record imports neither the front end nor the engine": (
        "service/record/base.py",
        "import service.engine.residency",
    ),
    "what every process shares imports neither side": ("service/views.py", "import service.frontend.schemas"),
    "training imports nothing of the service": ("training/recipe.py", "import service.settings"),
    "no bench imports another bench": ("bench/split.py", "import bench.serve"),
}


def contracts() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [c["name"] for c in config["tool"]["importlinter"]["contracts"]]


def lint(tree: pathlib.Path) -> tuple[int, str]:
    if not LINT_IMPORTS.exists():
        pytest.skip("lint-imports is not installed (the dev extras install it)")
    out = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.returncode, out.stdout + out.stderr


def broken(output: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^(.+) BROKEN$", output, re.M)}


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> pathlib.Path:
    """The packages' Python files and pyproject.toml, copied."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.safetensors", "*.png"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_every_contract_has_a_forbidden_import_to_prove_it() -> None:
    assert set(contracts()) <= set(FORBIDDEN), set(contracts()) - set(FORBIDDEN)


def test_each_forbidden_import_breaks_its_contract(tree: pathlib.Path) -> None:
    code, output = lint(tree)
    assert code == 0 and not broken(output), output
    names = contracts()
    for name in names:
        path, line = FORBIDDEN[name]
        module = tree / path
        module.write_text(module.read_text() + f"\n{line}  # forbidden\n")
        code, output = lint(tree)
        assert code != 0 and name in broken(output), (name, output)
        module.write_text(module.read_text().replace(f"\n{line}  # forbidden\n", ""))
    assert lint(tree)[0] == 0
