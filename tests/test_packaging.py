"""The checkout never shadows an installed top-level ``kernels`` (Hugging Face's hub-kernel loader), and
every Triton module of ``kernels/`` imports as ``pytrain.kernels.<name>`` (the wheel is checked by
``.ci/check_wheel``)."""
import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = sorted(p.stem for p in (ROOT / "kernels").glob("*.py"))


def test_kernels_folder_is_not_a_regular_package():
    assert KERNEL_MODULES, "kernels/ holds no Triton modules"
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow an installed `kernels`"


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_every_kernel_module_imports_as_pytrain_kernels(name):
    module = importlib.import_module(f"pytrain.kernels.{name}")
    assert Path(module.__file__).resolve() == (ROOT / "kernels" / f"{name}.py").resolve()


def test_import_kernels_from_the_checkout_finds_the_installed_package():
    """What setup.py and transformers do when run from the repository root (sys.path[0] = '')."""
    if importlib.util.find_spec("kernels") is None or importlib.util.find_spec("kernels").origin is None:
        pytest.fail("Hugging Face's `kernels` is not installed; the pinned set (requirements-test.txt) has it")
    code = "import kernels; print(kernels.__file__); print(hasattr(kernels, 'get_kernel'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path, has_api = out.split()
    assert not Path(path).resolve().is_relative_to(ROOT / "kernels"), path
    assert has_api == "True", f"`import kernels` found {path}, not Hugging Face's package"


DISTRIBUTION = "pytrain-kernels"  # PyPI's `pytrain` is an unrelated 2016-2017 project; the import name stays `pytrain`


def _setup_keyword(name: str):
    """The literal value of the keyword ``name`` of setup.py's ``setup(...)`` call, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1, "setup.py should call setup() once"
    return next(ast.literal_eval(k.value) for k in calls[0].keywords if k.arg == name)


def test_distribution_name_is_not_pypi_pytrain_and_used_everywhere():
    """setup.py's name, the wheel file .ci/check_wheel looks for, the name `make pin` leaves out of the pins
    and the README's install section all agree (a wheel's file name escapes '-' as '_')."""
    assert _setup_keyword("name") == DISTRIBUTION
    assert f'dist/{DISTRIBUTION.replace("-", "_")}-*.whl' in (ROOT / ".ci" / "check_wheel").read_text()
    assert f"--exclude {DISTRIBUTION};" in (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):].split("\n## ", 1)[0]
    assert f"pip show {DISTRIBUTION}" in install and f"`{DISTRIBUTION}`" in install
    assert _setup_keyword("entry_points") == {"console_scripts": ["pytrain=pytrain.cli:main"]}
