"""The package's layering: one module speaks to TorchServe, no import cycle, a quiet start."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.support.context import ROOT

HANDLER = ROOT / "handler"
OPTIONAL = ("torchao", "google.cloud.storage")


def handler_imports(path: Path) -> tuple[set[str], set[str]]:
    """The handler modules and the top-level packages a module imports, wherever in the module."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in getattr(node, "names", [])]
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for name in names:
            if name == "handler" and isinstance(node, ast.ImportFrom):
                ours.update(alias.name for alias in node.names)
            elif name.startswith("handler."):
                ours.add(name.split(".")[1])
            else:
                others.add(name.split(".")[0])
    return ours, others


MODULES = {path.stem: handler_imports(path) for path in HANDLER.glob("*.py") if path.stem != "__init__"}


def test_only_the_adapter_imports_torchserve():
    assert sorted(name for name, (_, others) in MODULES.items() if "ts" in others) == ["torchserve_handler"]


def test_no_module_imports_one_that_imports_it_back():
    def reach(start: str, seen: set[str]) -> set[str]:
        for name in MODULES[start][0] - seen:
            seen.add(name)
            reach(name, seen)
        return seen

    cycles = [name for name in MODULES if name in reach(name, set())]
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_nothing_imports_the_adapter():
    assert [name for name, (ours, _) in MODULES.items() if "torchserve_handler" in ours] == []


def test_the_package_map_names_every_module():
    import handler

    missing = [name for name in MODULES if f"`{name}`" not in handler.__doc__]
    assert not missing, f"handler/__init__.py does not describe {missing}"


def test_optional_libraries_are_not_imported_with_the_package():
    probe = "import sys, handler.torchserve_handler, handler.sources; print([m for m in %r if m in sys.modules])" % (OPTIONAL,)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_loading_a_model_prints_no_warnings_from_optional_backends(tiny_model_dir):
    """transformers imports torchao when it is installed; its CUDA-kernel and Triton warnings stay out of the way."""
    probe = (
        "import torch; from pathlib import Path; from handler.loading import load_model; "
        "from handler.settings import HandlerSettings; "
        f"load_model(Path({str(tiny_model_dir)!r}), HandlerSettings(warmup=False), torch.device('cpu'))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "torchao" not in result.stderr and "triton" not in result.stderr.lower(), result.stderr
