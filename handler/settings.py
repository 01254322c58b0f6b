"""The app's configuration, read once at start-up into one typed, frozen object.

Sources: the `handler:` section of the model's model-config.yaml (TorchServe hands it
over as `context.model_yaml_config`), and a few environment variables of the
container contract (`LLM_DTYPE`, `LLM_MODEL_DIR`, `AIP_STORAGE_URI`, and `LLM_CACHE_DIR` or
`LLM_RUN_DIR` for where `dtype: auto` keeps its decisions and reports them to the front, and
where the worker listens for the front's cancels), read here only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from handler.errors import RequestError
from handler.params import GenerationParams, ParamLimits, resolve_params

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8-dynamic", "fp16-dynamic", "int4-dynamic", "int8-weight-only", "int4-weight-only")
BATCHING_MODES = ("dynamic", "continuous")
TOOL_PROMPTS = ("auto", "fallback")
CONTINUOUS_PROBE_ROWS = 16
# `continuous.num_blocks: auto` on a CPU: 8,192 tokens of 64, which keeps the cache's share
# of a small host's RAM small (on a GPU, auto sizes it from free memory: handler.model.device).
CPU_NUM_BLOCKS = 128
DTYPE_CACHE_NAME = "dtype-decisions.json"
# Under $LLM_RUN_DIR, one `<app>.json` per app: the dtype decision its worker serves with, which the
# front's /health shows (gateway.contract.DTYPE_REPORTS names the same folder).
DTYPE_REPORTS = "dtype"


class SettingsError(ValueError):
    """The app's config is wrong: the worker must not start."""


def unknown_names(given: Iterable[str], known: Iterable[str], what: str) -> str | None:
    """The one check of names against an allow-list (config keys, CLI choices), and its one wording:
    ``unknown keys in handler.limits: foo; known: a, b``; None when every name is known.

    This module is torch-free, so the Vertex tools, the bench and the scripts use it too.
    """
    known = list(known)
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return None
    return f"unknown {what}: {', '.join(map(str, unknown))}; known: {', '.join(map(str, known))}"


@dataclass(frozen=True)
class ContinuousBatchingSettings:
    """Cache sizing for transformers' continuous batching; its defaults take most of the RAM on CPU.
    `num_blocks: auto` is CPU_NUM_BLOCKS on a CPU and what free memory holds on a GPU."""

    num_blocks: int | str = "auto"
    page_size: int = 64
    max_batch_tokens: int = 1024
    # The most sequences decoded together; the manager queues the rest until a row ends (or is
    # cancelled). auto: transformers' own bound (max_batch_tokens).
    max_rows: int | str = "auto"
    # On a CPU, a step that decodes every row's one token (up to 16 rows) runs its fused int4 layers compiled
    # (handler.schedulers.compiled_decode); false keeps every step eager.
    compile_decode_steps: bool = True


@dataclass(frozen=True)
class StructuredOutputSettings:
    """Bounds on compiling `response_format`s (handler.structured.grammars) and on following them
    (`max_mask_ms`, CPU time per token, handler.structured.constraint); the size limit on a format's
    source is `limits.max_response_format_bytes`, checked when the request is parsed."""

    compile_timeout_seconds: int = 5
    compile_memory_mb: int = 2048
    compile_threads: int = 2
    max_mask_ms: int = 50
    cache_entries: int = 256
    cache_mb: int = 256


@dataclass(frozen=True)
class HandlerSettings:
    dtype: str = "auto"
    # Where `dtype` came from: "config" (handler.dtype) or "LLM_DTYPE", a deploy's choice for its machine.
    dtype_source: str = "config"
    device_map: str | None = None
    offload_folder: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    quantization: str = "none"
    compile: bool = False
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_instances: int = 16
    max_prompt_chars: int = 100_000
    limits: ParamLimits = field(default_factory=ParamLimits)
    defaults: GenerationParams = field(default_factory=GenerationParams)
    prompt_template: str | None = None
    # How tools reach the prompt: `auto` uses the chat template's own tool rendering when it has one,
    # `fallback` always the tool block of handler.structured.tools (for templates whose call format differs).
    tool_prompt: str = "auto"
    deadline_seconds: float | None = None
    warmup: bool = True
    batching: str = "dynamic"
    continuous: ContinuousBatchingSettings = field(default_factory=ContinuousBatchingSettings)
    structured_output: StructuredOutputSettings = field(default_factory=StructuredOutputSettings)
    torch_threads: int | str = "auto"
    # Rows decoded together when `dtype: auto` times its candidates on a CPU: by default the
    # dynamic path's batchSize, or CONTINUOUS_PROBE_ROWS users sharing the manager.
    dtype_probe_rows: int | None = None
    # Where `dtype: auto` keeps its decision per host fingerprint (handler.model.dtype_cache), so
    # that restarts and heals reuse it: by default in $LLM_CACHE_DIR, else in the front's run
    # folder $LLM_RUN_DIR, which outlives TorchServe's restarts; absent, every start times anew.
    dtype_cache_file: str | None = None
    # TorchServe's own temp folder, which the front empties at each start of TorchServe
    # ($LLM_TORCHSERVE_TMP): a worker that finds its model's warm-up marker there is a worker
    # started again within one TorchServe's life (a heal), and skips the warm-up (handler.service).
    torchserve_tmp: str | None = None
    model_dir_override: str | None = None
    storage_uri: str | None = None
    # The front's run folder ($LLM_RUN_DIR): each worker binds its cancel socket there (handler.cancellation)
    # and reports its dtype decision in DTYPE_REPORTS.
    run_dir: str | None = None
    workers: int = 1
    batch_size: int = 1

    @classmethod
    def from_config(cls, model_yaml_config: Mapping[str, Any] | None, environ: Mapping[str, str]) -> HandlerSettings:
        section = dict((model_yaml_config or {}).get("handler") or {})
        from_env = {"model_dir_override", "storage_uri", "run_dir", "torchserve_tmp", "workers", "batch_size", "dtype_source"}
        known = {f.name for f in fields(cls)} - from_env
        problem = unknown_names(section, sorted(known), "keys in handler config")
        if problem:
            raise SettingsError(problem)
        limits = _build(ParamLimits, section.pop("limits", {}), "handler.limits")
        continuous = _build(ContinuousBatchingSettings, section.pop("continuous", {}), "handler.continuous")
        structured_output = _build(StructuredOutputSettings, section.pop("structured_output", {}), "handler.structured_output")
        try:
            defaults = resolve_params([("handler.defaults.", section.pop("defaults", {}) or {})], limits)
        except RequestError as error:
            raise SettingsError(f"invalid handler.defaults: {error}") from error
        if environ.get("LLM_DTYPE"):
            section["dtype"] = environ["LLM_DTYPE"]
            section["dtype_source"] = "LLM_DTYPE"
        settings = cls(
            **section,
            limits=limits,
            continuous=continuous,
            structured_output=structured_output,
            defaults=defaults,
            model_dir_override=environ.get("LLM_MODEL_DIR") or None,
            storage_uri=environ.get("AIP_STORAGE_URI") or None,
            run_dir=environ.get("LLM_RUN_DIR") or None,
            torchserve_tmp=environ.get("LLM_TORCHSERVE_TMP") or None,
            workers=max(1, int((model_yaml_config or {}).get("maxWorkers") or 1)),
            batch_size=max(1, int((model_yaml_config or {}).get("batchSize") or 1)),
        )
        if settings.dtype_cache_file is None:
            folder = environ.get("LLM_CACHE_DIR") or environ.get("LLM_RUN_DIR")
            if folder:
                settings = replace(settings, dtype_cache_file=str(Path(folder) / DTYPE_CACHE_NAME))
        if settings.dtype_probe_rows is None:
            rows = CONTINUOUS_PROBE_ROWS if settings.batching == "continuous" else settings.batch_size
            settings = replace(settings, dtype_probe_rows=rows)
        settings.verify()
        if settings.batching == "continuous" and not (model_yaml_config or {}).get("asyncCommunication"):
            raise SettingsError(
                "handler.batching: continuous needs asyncCommunication: true (and batchSize: 1) in model-config.yaml"
            )
        return settings

    def verify(self) -> None:
        _choice("dtype", self.dtype, DTYPES)
        _choice("batching", self.batching, BATCHING_MODES)
        _choice("quantization", self.quantization, QUANTIZATIONS)
        _choice("tool_prompt", self.tool_prompt, TOOL_PROMPTS)
        if self.device_map not in (None, "auto"):
            raise SettingsError(f"handler.device_map must be 'auto' or absent, got {self.device_map!r}")
        if not isinstance(self.compile, bool):
            raise SettingsError(f"handler.compile must be true or false, got {self.compile!r}")
        if self.compile and self.batching != "dynamic":
            raise SettingsError(
                "handler.compile needs handler.batching: dynamic (the continuous manager's paged forward is not compiled)"
            )
        if self.compile and self.device_map:
            raise SettingsError("handler.compile cannot be combined with handler.device_map (offloaded layers)")
        for name in ("max_input_tokens", "max_total_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SettingsError(f"handler.{name} must be a positive integer, got {value!r}")
        if self.torch_threads != "auto" and (
            isinstance(self.torch_threads, bool) or not isinstance(self.torch_threads, int) or self.torch_threads < 1
        ):
            raise SettingsError(f"handler.torch_threads must be 'auto' or a positive integer, got {self.torch_threads!r}")
        if self.dtype_probe_rows is not None and (
            isinstance(self.dtype_probe_rows, bool) or not isinstance(self.dtype_probe_rows, int) or self.dtype_probe_rows < 1
        ):
            raise SettingsError(f"handler.dtype_probe_rows must be a positive integer, got {self.dtype_probe_rows!r}")
        if self.dtype_cache_file is not None and (not isinstance(self.dtype_cache_file, str) or not self.dtype_cache_file):
            raise SettingsError(f"handler.dtype_cache_file must be a file path, got {self.dtype_cache_file!r}")
        if self.max_instances < 1:
            raise SettingsError("handler.max_instances must be >= 1")
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise SettingsError("handler.prompt_template must contain '{prompt}'")
        if self.deadline_seconds is not None and self.deadline_seconds <= 0:
            raise SettingsError("handler.deadline_seconds must be > 0")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingsError(f"handler.{name} must be one of {allowed}, got {value!r}")


def _build(kind: type, values: Mapping[str, Any] | None, where: str):
    values = dict(values or {})
    problem = unknown_names(values, sorted(f.name for f in fields(kind)), f"keys in {where}")
    if problem:
        raise SettingsError(problem)
    for name, value in values.items():
        default = getattr(kind(), name)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise SettingsError(f"{where}.{name} must be true or false, got {value!r}")
            continue
        if value == "auto" and default == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SettingsError(
                f"{where}.{name} must be a positive integer{' or auto' if default == 'auto' else ''}, got {value!r}"
            )
    return kind(**values)
