"""The handler's rules, held as tests: the layer order, one module speaks to TorchServe, a quiet start.

docs/architecture.md draws the layers; `LAYERS` is the same order. A unit is a top-level module
or a subpackage; a unit may import its own layer's modules and those of earlier layers, never a
later one, and there is no import cycle between modules either.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.context import ROOT

HANDLER = ROOT / "handler"
OPTIONAL = ("torchao", "google.cloud.storage")

# Earliest first: the vocabulary every layer shares, then the layers in the order a request meets them
# inside the worker, then the assembly that wires them to TorchServe.
LAYERS = (
    "errors",
    "response_format",
    "params",
    "settings",
    "cancellation",
    "structured",
    "pipeline",
    "decoding",
    "model",
    "schedulers",
    "api",
    "metrics",
    "service",
    "torchserve_handler",
)


def module_name(path: Path) -> str:
    """`handler/decoding/sequence.py` -> `decoding.sequence`; a package's `__init__` is the package."""
    parts = path.relative_to(HANDLER).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """The handler modules (dotted, under `handler.`) and the other top-level packages a module imports,
    anywhere in it (a function body or an `if TYPE_CHECKING:` block counts)."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "handler" or node.module.startswith("handler."):
                base = node.module.removeprefix("handler").lstrip(".")
                for alias in node.names:
                    candidate = f"{base}.{alias.name}".lstrip(".")
                    ours.add(candidate if candidate in MODULE_NAMES else base)
            else:
                others.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("handler."):
                    ours.add(alias.name.removeprefix("handler."))
                else:
                    others.add(alias.name.split(".")[0])
    ours.discard("")
    return ours, others


PATHS = {module_name(path): path for path in HANDLER.rglob("*.py") if module_name(path)}
MODULE_NAMES = set(PATHS)
MODULES = {name: imports_of(path) for name, path in PATHS.items()}


def layer_of(module: str) -> int:
    unit = module.split(".")[0]
    assert unit in LAYERS, f"handler.{module} is in no layer: add {unit!r} to LAYERS and to docs/architecture.md"
    return LAYERS.index(unit)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_its_own_and_earlier_layers(module):
    later = sorted(name for name in MODULES[module][0] if layer_of(name) > layer_of(module))
    assert not later, f"handler.{module} ({LAYERS[layer_of(module)]}) imports later layers: {later}"


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    """The check above must see `from handler.X import Y` and `from handler.pkg import module` alike."""
    probe = tmp_path / "probe.py"
    probe.write_text("from handler.service import Service\nfrom handler.schedulers import dynamic\n")
    ours, _ = imports_of(probe)
    assert ours == {"service", "schedulers.dynamic"}
    assert max(layer_of(name) for name in ours) > layer_of("decoding")


def test_only_the_adapter_imports_torchserve():
    assert sorted(name for name, (_, others) in MODULES.items() if "ts" in others) == ["torchserve_handler"]


def test_no_module_imports_one_that_imports_it_back():
    def reach(start: str, seen: set[str]) -> set[str]:
        for name in MODULES.get(start, (set(), set()))[0] - seen:
            seen.add(name)
            reach(name, seen)
        return seen

    cycles = [name for name in MODULES if name in reach(name, set())]
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_nothing_imports_the_adapter():
    assert [name for name, (ours, _) in MODULES.items() if "torchserve_handler" in ours] == []


def test_no_module_shadows_a_library():
    """`handler/x/requests.py` reads as the `requests` library in a traceback and in an editor's imports."""
    shadowing = sorted(name for name in MODULES if name.split(".")[-1] in sys.stdlib_module_names | {"requests"})
    assert not shadowing, f"handler modules named like a library: {shadowing}"


def test_the_package_map_names_every_module():
    import handler

    missing = [name for name in MODULES if name and f"`{name}`" not in handler.__doc__]
    assert not missing, f"handler/__init__.py does not describe {missing}"


def test_the_layers_are_the_documented_ones():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [unit for unit in LAYERS if f"`{unit}" not in text]
    assert not missing, f"docs/architecture.md does not name the layers {missing}"


def test_optional_libraries_are_not_imported_with_the_package():
    probe = f"import sys, handler.torchserve_handler, handler.model.sources; print([m for m in {OPTIONAL!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_loading_a_model_prints_no_warnings_from_optional_backends(tiny_model_dir):
    """transformers imports torchao when it is installed; its CUDA-kernel and Triton warnings stay out of the way."""
    probe = (
        "import torch; from pathlib import Path; from handler.model.loading import load_model; "
        "from handler.settings import HandlerSettings; "
        f"load_model(Path({str(tiny_model_dir)!r}), HandlerSettings(warmup=False), torch.device('cpu'))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "torchao" not in result.stderr and "triton" not in result.stderr.lower(), result.stderr


def exchange_classes() -> list[type]:
    """Every class in `handler.api` whose name ends in `Exchange`, the protocol itself aside."""
    import importlib

    found = []
    for name in sorted(MODULES):
        if name.startswith("api."):
            module = importlib.import_module(f"handler.{name}")
            found += [
                c
                for n, c in vars(module).items()
                if n.endswith("Exchange") and isinstance(c, type) and c.__module__ == module.__name__
            ]
    return [c for c in found if c.__name__ != "Exchange"]


def protocol_members(protocol: type) -> dict[str, object]:
    return {name: value for name, value in vars(protocol).items() if not name.startswith("_")}


def test_there_are_exchanges_to_check():
    assert {"NativeExchange", "OpenAIExchange", "VertexChatExchange"} <= {c.__name__ for c in exchange_classes()}


@pytest.mark.parametrize("exchange", exchange_classes(), ids=lambda c: c.__name__)
def test_every_exchange_implements_the_whole_protocol(exchange):
    """The adapter calls each of these on any exchange; one missing fails a request at run time, not here."""
    import inspect

    from handler.api.protocols import Exchange

    for name, member in protocol_members(Exchange).items():
        assert hasattr(exchange, name), f"{exchange.__name__} lacks {name}"
        if inspect.isfunction(member):
            wanted = list(inspect.signature(member).parameters)
            got = list(inspect.signature(getattr(exchange, name)).parameters)
            assert got == wanted, f"{exchange.__name__}.{name}{got} does not match Exchange.{name}{wanted}"


def test_the_protocol_check_sees_a_missing_method():
    from handler.api.protocols import Exchange

    assert {"piece", "stream_error", "parse", "body", "stream", "content_type"} <= set(protocol_members(Exchange))
