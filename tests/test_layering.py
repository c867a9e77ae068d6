"""The package's layers, read from the source: engine -> runtime -> api, and no import cycles.

Imports are read statically (every ``import`` statement, function-level ones included), so a
lazy import cannot hide a cycle or a layer breach.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "service"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports: ``from a.b import c`` counts as ``a.b.c`` when that is a
    module of ours, else as ``a.b``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return found


GRAPH = {name: {m for m in _imports(path) if m in MODULES} for name, path in MODULES.items()}


def _layer(prefix: str) -> list[str]:
    return [name for name in MODULES if name == prefix or name.startswith(prefix + ".")]


@pytest.mark.parametrize("module", _layer("service.engine"))
def test_engine_modules_import_no_runtime_api_or_web_framework(module: str) -> None:
    imported = _imports(MODULES[module])
    forbidden = (
        "service.runtime",
        "service.api",
        "service.settings",
        "service.local",
        "fastapi",
        "starlette",
    )
    assert not sorted(m for m in imported if m.startswith(forbidden))


#: The engine's rooms and the rooms each may use: what a model is at the bottom, the CAM
#: methods on it, the faithfulness scores on the maps; pictures draw decoded images; loading
#: puts a model together (and warms it up with one explanation), asking hub whether weights can
#: be downloaded; plan resolves a request.
ENGINE_ROOMS: dict[str, set[str]] = {
    "hub": set(),
    "models": set(),
    "imaging": set(),
    "cam": {"models"},
    "faithfulness": {"models", "cam"},
    "pictures": {"imaging"},
    "loading": {"models", "cam", "hub"},
    "plan": {"models", "cam", "faithfulness"},
}


def _engine_room(module: str) -> str:
    return module.split(".")[2]


@pytest.mark.parametrize("module", [m for m in _layer("service.engine") if m != "service.engine"])
def test_engine_rooms_use_only_the_rooms_below_them(module: str) -> None:
    room = _engine_room(module)
    assert room in ENGINE_ROOMS, f"{module}: a room of the engine not in ENGINE_ROOMS"
    used = {_engine_room(m) for m in _imports(MODULES[module]) if m.startswith("service.engine.")}
    assert sorted(used - ENGINE_ROOMS[room] - {room}) == []


@pytest.mark.parametrize("module", _layer("service.runtime"))
def test_runtime_modules_import_no_api_or_web_framework(module: str) -> None:
    imported = _imports(MODULES[module])
    forbidden = ("service.api", "service.settings", "service.local", "fastapi", "starlette")
    assert not sorted(m for m in imported if m.startswith(forbidden))


@pytest.mark.parametrize("module", _layer("service.serving"))
def test_serving_operations_know_no_protocol_or_web_framework(module: str) -> None:
    """The operations every protocol shares import neither a protocol nor the settings."""
    imported = _imports(MODULES[module])
    forbidden = ("service.api", "service.settings", "service.local", "fastapi", "starlette")
    assert not sorted(m for m in imported if m.startswith(forbidden))


@pytest.mark.parametrize("module", [*_layer("service.engine"), *_layer("service.runtime")])
def test_nothing_below_the_operations_uses_them(module: str) -> None:
    assert not sorted(m for m in _imports(MODULES[module]) if m.startswith("service.serving"))


@pytest.mark.parametrize("module", _layer("service.local"))
def test_local_commands_use_the_engine_not_the_server(module: str) -> None:
    imported = _imports(MODULES[module])
    forbidden = ("service.api", "fastapi", "starlette", "uvicorn")
    assert not sorted(m for m in imported if m.startswith(forbidden))


@pytest.mark.parametrize(
    "module",
    [
        m
        for layer in ("service.engine", "service.runtime", "service.api", "service.local")
        for m in _layer(layer)
    ],
)
def test_nothing_below_the_command_line_imports_its_commands(module: str) -> None:
    imported = _imports(MODULES[module])
    assert not sorted(m for m in imported if m == "service.cli" or m.startswith("service.commands"))


#: The only modules that import Ray (the optional ``ray`` extra).
RAY_MODULES = {"service.ray_serve.deployment", "service.ray_serve.command"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_ray_serve_modules_import_ray(module: str) -> None:
    imports_ray = any(m == "ray" or m.startswith("ray.") for m in _imports(MODULES[module]))
    assert imports_ray == (module in RAY_MODULES)


def test_nothing_outside_ray_serve_imports_its_ray_modules() -> None:
    """The plain server never loads Ray: only the CLI's ``ray`` command reaches it."""
    importers = sorted(
        name
        for name, imported in GRAPH.items()
        if imported & RAY_MODULES and not name.startswith("service.ray_serve")
    )
    assert importers == ["service.cli"]


def test_no_import_cycle_between_service_modules() -> None:
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for dependency in sorted(GRAPH[module]):
            if dependency in path:
                cycles.append([*path[path.index(dependency) :], dependency])
            elif dependency not in done:
                visit(dependency, [*path, dependency])
        done.add(module)

    for module in MODULES:
        visit(module, [module])
    assert not cycles


def test_the_graph_is_read_from_real_imports() -> None:
    """Guards the checks above against reading nothing."""
    assert "service.engine.models.loaded" in GRAPH["service.engine.cam.explain"]
    assert "service.engine.cam.explain" in GRAPH["service.engine.faithfulness.scores"]
    assert "service.runtime.batching" in GRAPH["service.runtime.workers"]
    assert "service.serving.operations" in GRAPH["service.api.routes.models"]
