"""Service settings: one typed ``Settings`` object read from ``GRADCAM_*`` environment variables.

:func:`get_settings` reads them once per process; the app keeps the ``Settings`` it was built
with (``app.state.settings``, read by its endpoints' dependency); the runtime gets the plain
:class:`~service.runtime.config.RuntimeConfig` it maps onto, and the models come from
``GRADCAM_MODELS_FILE`` (YAML or JSON) when set, else ``GRADCAM_MODELS``. The ``ray_*``
settings size the deployment on Ray Serve (:mod:`service.ray_serve`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engine.imaging.images import DEFAULT_LIMITS, ImageLimits
from service.engine.models.spec import ModelSpec, check_unique_names
from service.runtime.config import (
    AutocastMode,
    BatchSize,
    BatchWaitMs,
    CpuWorkers,
    ForwardPasses,
    MapSide,
    QueueSize,
    RuntimeConfig,
    SliceMs,
    TimeoutS,
    TorchThreads,
    WaitMs,
    WorkersPerDevice,
)

LogLevel = Literal["critical", "error", "warning", "info", "debug"]

_DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
_RUNTIME = RuntimeConfig()


class ConfigError(ValueError):
    """The configuration is unusable; the message says which setting and why."""


def _default_models() -> list[ModelSpec]:
    return [
        ModelSpec(name="resnet50", architecture="resnet50", weights="hub", fallback_to_random=True)
    ]


def browser_origin(value: str) -> str:
    """``value`` as the exact origin a browser sends (``scheme://host[:port]``): scheme and host
    lower-cased, a default port and a trailing ``/`` dropped. ``ValueError`` for anything else
    (a path, a query, credentials, a wildcard, ``null``), so a typo fails at start-up instead of
    never matching."""
    text = value.strip()
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (
        parts.scheme.lower() not in ("http", "https")
        or not parts.hostname
        or "*" in text
        or port == -1
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or text.endswith(("?", "#"))
    ):
        raise ValueError(
            f"{value!r} is not an origin; write scheme://host[:port], e.g."
            " https://app.example.org or http://localhost:3000 (no path, no wildcard)"
        )
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    default_port = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + (f":{port}" if port not in (None, default_port) else "")


_PREFIX = "GRADCAM_"


def _renamed(name: str, old: str) -> AliasChoices:
    """A setting's variables under its name and under the name it had before (an alias given
    in full: pydantic-settings adds no prefix to aliases), and both as keyword arguments."""
    return AliasChoices(_PREFIX + name.upper(), _PREFIX + old.upper(), name, old)


def validation_summary(exc: ValidationError, *, as_variables: bool = False) -> str:
    """One line naming every invalid field and why: by dotted path, or by the ``GRADCAM_*``
    variable that sets it. Input values are left out (they may be secrets)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in error["loc"]]
        if as_variables:
            where = "_".join(loc).upper() if loc else "settings"
            where = where if where.startswith(_PREFIX) or not loc else _PREFIX + where
        else:
            where = ".".join(loc) or "(top level)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def read_config_file(variable: str, path: Path) -> str:
    """The text of the file a setting names, or a :class:`ConfigError` saying why not."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{variable}: cannot read {path} ({exc.strerror or type(exc).__name__})."
        ) from None


def load_models_file(path: Path) -> list[ModelSpec]:
    """Read ``{"models": [ModelSpec, ...]}`` from a YAML or JSON file.

    Relative weight and label file paths are taken relative to the file's own folder, so a
    models file and its weights can be moved together. Raises :class:`ConfigError` with a
    sentence naming the file and the faulty entry.
    """
    text = read_config_file("GRADCAM_MODELS_FILE", path)
    try:
        data: Any = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"GRADCAM_MODELS_FILE: {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ConfigError(
            f"GRADCAM_MODELS_FILE: {path} must hold a mapping with a 'models' list, e.g."
            " 'models: [{name: resnet50, architecture: resnet50, weights: hub}]'."
        )
    unknown = sorted(set(data) - {"models"})
    if unknown:
        raise ConfigError(
            f"GRADCAM_MODELS_FILE: {path} has unknown top-level keys: {', '.join(unknown)}."
        )
    entries: list[Any] = data["models"]
    if not entries:
        raise ConfigError(f"GRADCAM_MODELS_FILE: {path} lists no models.")
    specs: list[ModelSpec] = []
    for position, entry in enumerate(entries):
        if isinstance(entry, dict):
            entry = _relative_to(entry, path.parent)
        try:
            specs.append(ModelSpec.model_validate(entry))
        except ValidationError as exc:
            name = entry.get("name") if isinstance(entry, dict) else None
            which = f"models[{position}]" + (f" ({name})" if name else "")
            raise ConfigError(
                f"GRADCAM_MODELS_FILE: {path}: {which}: {validation_summary(exc)}"
            ) from exc
    try:
        check_unique_names(specs)
    except ValueError as exc:
        raise ConfigError(f"GRADCAM_MODELS_FILE: {path}: {exc}") from None
    return specs


def _relative_to(entry: dict[str, Any], folder: Path) -> dict[str, Any]:
    entry = dict(entry)
    weights = entry.get("weights")
    if isinstance(weights, str) and weights not in ("hub", "random"):
        entry["weights"] = str(_resolve(weights, folder))
    labels_file = entry.get("labels_file")
    if isinstance(labels_file, str):
        entry["labels_file"] = str(_resolve(labels_file, folder))
    return entry


def _resolve(value: str, folder: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else folder / path


class Settings(BaseSettings):
    """Everything configurable, from ``GRADCAM_<FIELD>`` environment variables.

    Lists (``GRADCAM_MODELS``) are given as JSON. Unknown ``GRADCAM_*`` variables are ignored.
    """

    model_config = SettingsConfigDict(
        env_prefix=_PREFIX,
        env_file=None,
        # A variable set but empty (``GRADCAM_MODELS=`` from a compose file) counts as unset.
        env_ignore_empty=True,
        extra="ignore",
        validate_default=True,
        protected_namespaces=(),
    )

    # ---------------------------------------------------------------- server
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port to listen on.")
    log_level: LogLevel = Field(default="info", description="Logging level.")
    graceful_shutdown_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, how long in-flight requests may take before they are cut.",
    )

    # ---------------------------------------------------------------- models
    device: str = Field(
        default="auto",
        pattern=_DEVICE_PATTERN,
        description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.",
    )
    models_file: Path | None = Field(
        default=None,
        description="YAML or JSON file with a 'models' list; wins over GRADCAM_MODELS.",
    )
    models: list[ModelSpec] = Field(
        default_factory=_default_models,
        min_length=1,
        description="Models to serve, as a JSON list of model specs.",
    )

    # ---------------------------------------------------------------- access
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="API keys (JSON list): plain keys of at least 16 characters, or"
        " 'sha256:<hex>' digests of them. With any key set, every route needs one but the"
        " probes, the page and the API documentation.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="File of API keys or 'sha256:<hex>' digests, one a line ('#' comments);"
        " added to GRADCAM_API_KEYS.",
    )

    # ---------------------------------------------------------------- browsers
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins whose pages may call the API from a browser (CORS), exactly as the"
        " browser sends them, e.g. https://app.example.org. Empty: no cross-origin access.",
    )

    # ---------------------------------------------------------------- request limits
    max_upload_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024, description="Largest request body accepted (413)."
    )
    max_response_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=64 * 1024,
        description="Largest explain answer, estimated before any model work (422 past it).",
    )
    max_images_per_request: int = Field(
        default=16, ge=1, le=1024, description="Most images in one request (422)."
    )
    max_image_pixels: int = Field(
        default=DEFAULT_LIMITS.max_pixels, ge=1, description="Largest decoded image, in pixels."
    )
    max_image_side: int = Field(
        default=DEFAULT_LIMITS.max_side, ge=1, description="Largest image width or height."
    )

    # ---------------------------------------------------------------- runtime
    workers_per_device: WorkersPerDevice = _RUNTIME.workers_per_device
    cpu_workers: CpuWorkers = _RUNTIME.cpu_workers
    torch_threads: TorchThreads | None = _RUNTIME.torch_threads
    max_batch_size: BatchSize = _RUNTIME.max_batch_size
    max_batch_wait_ms: BatchWaitMs = _RUNTIME.max_batch_wait_ms
    max_queue_size: QueueSize = _RUNTIME.max_queue_size
    max_queued_per_caller: QueueSize = _RUNTIME.max_queued_per_caller
    max_queue_wait_ms: WaitMs = _RUNTIME.max_queue_wait_ms
    request_timeout_s: TimeoutS = _RUNTIME.request_timeout_s
    autocast: AutocastMode = _RUNTIME.autocast
    # Before CAM methods declared their costs these were Score-CAM's: the old names still work.
    explain_max_forward_passes: ForwardPasses = Field(
        default=_RUNTIME.explain_max_forward_passes,
        validation_alias=_renamed("explain_max_forward_passes", "scorecam_max_forward_passes"),
    )
    perturbation_batch_size: BatchSize = Field(
        default=_RUNTIME.perturbation_batch_size,
        validation_alias=_renamed("perturbation_batch_size", "scorecam_batch_size"),
    )
    score_max_forward_passes: ForwardPasses = _RUNTIME.score_max_forward_passes
    score_max_road_solves: ForwardPasses = _RUNTIME.score_max_road_solves
    score_batch_size: BatchSize = _RUNTIME.score_batch_size
    work_slice_ms: SliceMs = _RUNTIME.work_slice_ms
    max_upsampled_side: MapSide = _RUNTIME.max_upsampled_side
    exact_decode: bool = _RUNTIME.exact_decode

    # ---------------------------------------------------------------- scale out (Ray Serve)
    ray_replicas: int = Field(
        default=1,
        ge=1,
        le=4096,
        description="gradcam-service ray: replicas of the application, each one runtime with its"
        " models, when it does not autoscale.",
    )
    ray_min_replicas: int | None = Field(
        default=None,
        ge=1,
        description="Autoscaling's lower bound (with GRADCAM_RAY_MAX_REPLICAS; default 1).",
    )
    ray_max_replicas: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Set it to autoscale between GRADCAM_RAY_MIN_REPLICAS and it on ongoing"
        " requests per replica.",
    )
    ray_target_ongoing_requests: float | None = Field(
        default=None,
        gt=0,
        description="Autoscaling's target of ongoing requests per replica (default twice"
        " GRADCAM_MAX_BATCH_SIZE: one batch computing, the next one filling).",
    )
    ray_max_ongoing_requests: int | None = Field(
        default=None,
        ge=1,
        description="Requests Ray Serve hands one replica at once (default GRADCAM_MAX_QUEUE_SIZE"
        " + GRADCAM_MAX_BATCH_SIZE, so that batches fill and the replica's own admission, not"
        " Serve, answers overload).",
    )
    ray_gpus_per_replica: float | None = Field(
        default=None,
        ge=0,
        description="GPUs each replica reserves (default 1 when the Ray cluster has GPUs, else 0).",
    )
    ray_cpus_per_replica: float = Field(
        default=1.0, ge=0, description="CPUs each replica reserves in the Ray cluster."
    )

    @field_validator("log_level", "device", "autocast", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("models_file", "api_keys_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        return list(dict.fromkeys(browser_origin(value) for value in values))

    @model_validator(mode="after")
    def _unique_model_names(self) -> Settings:
        check_unique_names(self.models)
        return self

    @model_validator(mode="after")
    def _requests_fit_the_queues(self) -> Settings:
        """A request the API accepts must fit the queues, or it would get 429 forever."""
        room = min(self.max_queue_size, self.max_queued_per_caller)
        if self.max_images_per_request > room:
            raise ValueError(
                f"GRADCAM_MAX_IMAGES_PER_REQUEST ({self.max_images_per_request}) is more than a"
                f" model's queue takes from one caller (GRADCAM_MAX_QUEUE_SIZE"
                f" {self.max_queue_size}, GRADCAM_MAX_QUEUED_PER_CALLER"
                f" {self.max_queued_per_caller}): such requests could never be served."
            )
        return self

    @model_validator(mode="after")
    def _replica_bounds(self) -> Settings:
        if self.ray_min_replicas is not None and self.ray_max_replicas is None:
            raise ValueError(
                "GRADCAM_RAY_MIN_REPLICAS bounds autoscaling: set GRADCAM_RAY_MAX_REPLICAS too"
                " (or GRADCAM_RAY_REPLICAS for a fixed count)"
            )
        if self.ray_max_replicas is not None and self.ray_max_replicas < (
            self.ray_min_replicas or 1
        ):
            raise ValueError("GRADCAM_RAY_MAX_REPLICAS is below GRADCAM_RAY_MIN_REPLICAS")
        if (
            self.ray_max_ongoing_requests is not None
            and self.ray_max_ongoing_requests < self.max_batch_size
        ):
            raise ValueError(
                f"GRADCAM_RAY_MAX_ONGOING_REQUESTS ({self.ray_max_ongoing_requests}) is below"
                f" GRADCAM_MAX_BATCH_SIZE ({self.max_batch_size}): a replica would never hold"
                " enough requests to fill a batch"
            )
        return self

    def runtime_config(self) -> RuntimeConfig:
        """The runtime's view of these settings."""
        return RuntimeConfig(
            device=self.device,
            workers_per_device=self.workers_per_device,
            cpu_workers=self.cpu_workers,
            torch_threads=self.torch_threads,
            max_batch_size=self.max_batch_size,
            max_batch_wait_ms=self.max_batch_wait_ms,
            max_queue_size=self.max_queue_size,
            max_queued_per_caller=self.max_queued_per_caller,
            max_queue_wait_ms=self.max_queue_wait_ms,
            request_timeout_s=self.request_timeout_s,
            autocast=self.autocast,
            explain_max_forward_passes=self.explain_max_forward_passes,
            perturbation_batch_size=self.perturbation_batch_size,
            score_max_forward_passes=self.score_max_forward_passes,
            score_max_road_solves=self.score_max_road_solves,
            score_batch_size=self.score_batch_size,
            work_slice_ms=self.work_slice_ms,
            max_upsampled_side=self.max_upsampled_side,
            exact_decode=self.exact_decode,
            image_limits=ImageLimits(
                max_pixels=self.max_image_pixels, max_side=self.max_image_side
            ),
        )

    def model_specs(self) -> list[ModelSpec]:
        """The models to serve: from ``models_file`` when set, else ``models``."""
        if self.models_file is not None:
            return load_models_file(self.models_file)
        return list(self.models)

    def with_models_inline(self) -> Settings:
        """These settings with the models file read into ``models`` (weight paths made
        absolute), for processes that may not see the file: Ray Serve's replicas."""
        if self.models_file is None:
            return self
        return self.model_copy(update={"models": self.model_specs(), "models_file": None})


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once (the app factory's default)."""
    return Settings()
