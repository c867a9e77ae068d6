"""Settings from GRADCAM_* variables and the models file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli import main
from service.engine.imaging.images import ImageLimits
from service.runtime.config import RuntimeConfig
from service.settings import (
    ConfigError,
    Settings,
    get_settings,
    load_models_file,
    validation_summary,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GRADCAM_"):
            monkeypatch.delenv(name)


def test_defaults_serve_resnet50_from_the_hub_with_a_random_fallback() -> None:
    settings = Settings()
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 8000, "auto")
    assert settings.max_upload_bytes == 20 * 1024 * 1024
    assert settings.max_images_per_request == 16
    (spec,) = settings.model_specs()
    assert (spec.name, spec.architecture, spec.weights) == ("resnet50", "resnet50", "hub")
    assert spec.fallback_to_random is True
    assert settings.runtime_config() == RuntimeConfig()


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADCAM_PORT", "9001")
    monkeypatch.setenv("GRADCAM_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("GRADCAM_DEVICE", "cuda:1")
    monkeypatch.setenv("GRADCAM_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("GRADCAM_AUTOCAST", "bf16")
    monkeypatch.setenv("GRADCAM_MAX_IMAGE_SIDE", "4096")
    monkeypatch.setenv(
        "GRADCAM_MODELS",
        json.dumps([{"name": "tiny", "architecture": "resnet18", "weights": "random"}]),
    )
    settings = Settings()
    assert settings.port == 9001
    assert settings.log_level == "debug"
    assert [spec.name for spec in settings.model_specs()] == ["tiny"]
    config = settings.runtime_config()
    assert config.device == "cuda:1"
    assert config.max_batch_size == 32
    assert config.autocast == "bf16"
    assert config.image_limits == ImageLimits(max_pixels=40_000_000, max_side=4096)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GRADCAM_PORT", "0"),
        ("GRADCAM_DEVICE", "tpu"),
        ("GRADCAM_LOG_LEVEL", "loud"),
        ("GRADCAM_MAX_BATCH_SIZE", "0"),
        ("GRADCAM_AUTOCAST", "fp8"),
        ("GRADCAM_MODELS", "[]"),
        ("GRADCAM_MODELS", '[{"name": "a b", "architecture": "resnet18"}]'),
    ],
)
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_duplicate_model_names_are_refused() -> None:
    spec = {"name": "a", "architecture": "resnet18", "weights": "random"}
    with pytest.raises(ValidationError, match="unique"):
        Settings.model_validate({"models": [spec, spec]})


def test_models_file_wins_and_resolves_paths_next_to_it(tmp_path: Path) -> None:
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        "models:\n"
        "  - name: xray\n"
        "    architecture: resnet18\n"
        "    num_classes: 4\n"
        "    weights: weights/xray.safetensors\n"
        "    labels_file: labels.txt\n"
        "  - name: plain\n"
        "    architecture: resnet18\n"
        "    weights: random\n"
    )
    settings = Settings(models_file=models_file)
    xray, plain = settings.model_specs()
    assert xray.weights == str(tmp_path / "weights" / "xray.safetensors")
    assert xray.labels_file == tmp_path / "labels.txt"
    assert plain.weights == "random"


def test_models_file_in_json(tmp_path: Path) -> None:
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps({"models": [{"name": "m", "architecture": "resnet18"}]}))
    assert [spec.name for spec in load_models_file(models_file)] == ["m"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [", "not valid YAML/JSON"),
        ("- name: x\n", "mapping with a 'models' list"),
        ("models: []\n", "lists no models"),
        ("models: []\nextra: 1\n", "unknown top-level keys: extra"),
        ("models:\n  - name: m\n    architecture: resnet18\n    wieghts: hub\n", "models[0] (m)"),
        ("models:\n  - {name: m, architecture: r}\n  - {name: m, architecture: r}\n", "unique"),
    ],
)
def test_bad_models_file_gives_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    models_file = tmp_path / "models.yaml"
    models_file.write_text(text)
    with pytest.raises(ConfigError, match=r"GRADCAM_MODELS_FILE|unique") as raised:
        Settings(models_file=models_file).model_specs()
    assert message in str(raised.value)


def test_missing_models_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Settings(models_file=tmp_path / "absent.yaml").model_specs()


def test_the_example_models_file_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "models.example.yaml"
    specs = Settings(models_file=example).model_specs()
    assert specs


def test_get_settings_is_cached() -> None:
    get_settings.cache_clear()
    try:
        assert get_settings() is get_settings()
    finally:
        get_settings.cache_clear()


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"`GRADCAM_{name.upper()}`" in readme, f"README lacks GRADCAM_{name.upper()}"


def test_cors_origins_are_read_as_exact_browser_origins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().cors_origins == []
    monkeypatch.setenv(
        "GRADCAM_CORS_ORIGINS",
        '["https://App.Example.org/", "http://localhost:3000", "https://app.example.org:443"]',
    )
    assert Settings().cors_origins == ["https://app.example.org", "http://localhost:3000"]


@pytest.mark.parametrize(
    "origin",
    [
        "*",
        "null",
        "https://*.example.org",
        "example.org",
        "ftp://example.org",
        "https://example.org/app",
        "https://example.org?x=1",
        "https://user@example.org",
        "https://example.org:99999",
    ],
)
def test_cors_origins_that_a_browser_never_sends_are_refused(origin: str) -> None:
    with pytest.raises(ValidationError, match="is not an origin"):
        Settings(cors_origins=[origin])


def test_a_request_limit_the_queues_could_never_take_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="could never be served"):
        Settings(max_images_per_request=16, max_queued_per_caller=8)
    Settings(max_images_per_request=8, max_queued_per_caller=8)


def test_a_list_setting_that_is_not_json_stops_the_service_with_a_sentence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GRADCAM_API_KEYS", '["secret-key-material-0123')
    assert main(["serve"]) == 2
    error = capsys.readouterr().err
    assert "invalid configuration" in error
    assert "api_keys" in error
    assert "secret-key-material" not in error


def test_empty_variables_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GRADCAM_MODELS=`` (as a compose file or a shell export leaves it) gives the default,
    for JSON lists and numbers alike, instead of stopping the service."""
    defaults = Settings()
    for name in ("MODELS", "API_KEYS", "API_KEYS_FILE", "CORS_ORIGINS", "PORT", "MAX_BATCH_SIZE"):
        monkeypatch.setenv(f"GRADCAM_{name}", "")
    settings = Settings()
    assert settings == defaults
    (spec,) = settings.model_specs()
    assert (spec.name, spec.weights) == ("resnet50", "hub")
    assert settings.api_keys == []
    assert settings.api_keys_file is None
    assert settings.port == 8000
    assert settings.runtime_config() == RuntimeConfig()


@pytest.mark.parametrize("name", ["GRADCAM_MODELS", "GRADCAM_API_KEYS", "GRADCAM_PORT"])
def test_each_empty_variable_alone_is_the_default(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "")
    assert Settings() == Settings.model_validate({})


@pytest.mark.parametrize(
    ("variable", "field"),
    [
        ("GRADCAM_EXPLAIN_MAX_FORWARD_PASSES", "explain_max_forward_passes"),
        ("GRADCAM_SCORECAM_MAX_FORWARD_PASSES", "explain_max_forward_passes"),
        ("GRADCAM_PERTURBATION_BATCH_SIZE", "perturbation_batch_size"),
        ("GRADCAM_SCORECAM_BATCH_SIZE", "perturbation_batch_size"),
    ],
)
def test_method_cost_settings_are_read_under_their_names_and_their_score_cam_ones(
    monkeypatch: pytest.MonkeyPatch, variable: str, field: str
) -> None:
    monkeypatch.setenv(variable, "7")
    settings = Settings()
    assert getattr(settings, field) == 7
    assert getattr(settings.runtime_config(), field) == 7


def test_a_renamed_setting_out_of_bounds_names_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GRADCAM_EXPLAIN_MAX_FORWARD_PASSES", "0")
    with pytest.raises(ValidationError) as invalid:
        Settings()
    summary = validation_summary(invalid.value, as_variables=True)
    assert summary.startswith("GRADCAM_EXPLAIN_MAX_FORWARD_PASSES: ")
