"""What to merge: mergekit-style YAML (or the pipeline's `merge` section) → a checked `MergeSpec`.

Accepted YAML (mergekit 0.1.5 `models` form): `models` (each `{model, parameters}`),
`base_model`, `merge_method`, `parameters`, `dtype`, `out_dtype`, `tokenizer_source: base`;
plus fusion_ray's own keys: `variant` (sce: `mergekit`, the default here, or `fusechat`),
`vocab` (`strict`, or `common`: merge embed/lm_head over the common sub-matrix, FuseChat),
`selection` (`fast`: O(n) top-k, ties → lower index; `sort`: torch's sort as mergekit, for
bit-for-bit parity in bfloat16 where equal values are common),
`allow_pickle` (read `.bin` checkpoints) and `shard_size_mb`. Anything else, an unknown
method or an unknown parameter fails with its name.

A parameter is a scalar, a gradient (list interpolated over the layer index, t ∈ [0, 1]),
or `{filter, value}` conditions (first whose filter is a substring of the tensor name);
a model's own setting wins over the global one, then the method's default (mergekit's
precedence and defaults). The methods themselves, their parameters and defaults are
declared once in `fusion_ray.merge.registry`. Pure Python: no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fusion_ray.errors import ConfigError, format_errors
from fusion_ray.merge.registry import METHODS, REQUIRED, MergeMethod, unknown_method
from fusion_ray.yamlfile import read_yaml_file

Dtype = Literal["float32", "bfloat16", "float16", "float64"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInput(_Strict):
    model: str
    parameters: dict[str, Any] | None = None
    layer_range: tuple[int, int] | None = None  # from a one-slice config; must cover every layer


class MergeSpec(_Strict):
    """A merge: inputs, method, parameters, dtypes. Inputs are local HF model dirs."""

    models: list[ModelInput]
    base_model: str | None = None
    merge_method: str
    parameters: dict[str, Any] | None = None
    dtype: Dtype | None = None
    out_dtype: Dtype | None = None
    tokenizer_source: Literal["base"] | None = None
    variant: Literal["mergekit", "fusechat"] = "mergekit"
    vocab: Literal["strict", "common"] = "strict"
    selection: Literal["fast", "sort"] = "fast"
    allow_pickle: bool = False
    shard_size_mb: int = 2000

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(unknown_method(v))
        return v

    @property
    def method(self) -> MergeMethod:
        return METHODS[self.merge_method]

    def inputs(self) -> list[str]:
        """Model paths in input order: the listed models, then the base when not listed."""
        paths = [m.model for m in self.models]
        if self.base_model and self.base_model not in paths:
            paths.append(self.base_model)
        return paths

    def base_index(self) -> int | None:
        """Index of the base in `inputs()` for methods that use one (linear ignores it)."""
        if not self.method.needs_base or not self.base_model:
            return None
        return self.inputs().index(self.base_model)

    def pivot(self) -> str:
        """The model whose config, tokenizer and chat template the output takes."""
        return self.base_model or self.models[0].model

    def check(self) -> MergeSpec:
        """Structural checks and parameter names; values are resolved per tensor when planning.

        Raises:
            ValueError: naming the method, the parameter or the count at fault.
        """
        spec, n = self.method, len(self.inputs())
        if spec.needs_base and not self.base_model:
            raise ValueError(f"merge_method {self.merge_method} needs base_model")
        if n < spec.min_inputs or (spec.max_inputs and n > spec.max_inputs):
            want = spec.min_inputs if spec.max_inputs == spec.min_inputs else f"at least {spec.min_inputs}"
            raise ValueError(f"merge_method {self.merge_method} takes {want} models (base included); got {n}")
        known = spec.parameters()
        for where, params in [("parameters", self.parameters)] + [
                (f"models[{i}].parameters", m.parameters) for i, m in enumerate(self.models)]:
            unknown = sorted(set(params or {}) - known)
            if unknown:
                raise ValueError(f"{where}: unknown parameter(s) {', '.join(unknown)} for "
                                 f"{self.merge_method}; known: {', '.join(sorted(known)) or 'none'}")
        return self

    def shared_params(self, tensor: str, t: float) -> dict[str, Any]:
        """Method-wide parameters resolved for one tensor at layer position t."""
        return {name: _resolve(name, default, [self.parameters], tensor, t)
                for name, default in self.method.shared.items()}

    def input_params(self, index: int, tensor: str, t: float) -> dict[str, Any]:
        """Per-input parameters of input `index` (the model's own setting wins)."""
        path = self.inputs()[index]
        own = next((m.parameters for m in self.models if m.model == path), None)
        return {name: _resolve(name, default, [own, self.parameters], tensor, t)
                for name, default in self.method.per_input.items()}


def _kind(default: Any, name: str) -> type:
    if name in ("normalize", "rescale", "int8_mask", "filter_wise"):
        return bool
    return float if default is REQUIRED or isinstance(default, float) else type(default)


def _cast(name: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"parameter {name} must be true or false (got {value!r})")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"parameter {name} must be a number (got {value!r})")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"parameter {name} must be a number (got {value!r})") from None


def _evaluate(name: str, kind: type, setting: Any, tensor: str, t: float) -> Any:
    """mergekit's evaluate_setting: scalar, gradient, or filtered conditions; None: no match."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return _cast(name, kind, setting)
    if not setting:
        return None
    if all(not isinstance(e, dict) for e in setting):
        values = [_cast(name, kind, e) for e in setting]
        if kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in setting:
        if not isinstance(cond, dict) or set(cond) - {"filter", "value"} or "value" not in cond:
            raise ValueError(f"parameter {name}: a condition is {{filter, value}} (got {cond!r})")
        pattern = cond.get("filter")
        if pattern is None or pattern == "*" or (tensor and pattern in tensor):
            return _evaluate(name, kind, cond["value"], tensor, t)
    return None


def _resolve(name: str, default: Any, scopes: list[dict | None], tensor: str, t: float) -> Any:
    kind = _kind(default, name)
    for scope in scopes:
        if scope and name in scope:
            value = _evaluate(name, kind, scope[name], tensor, t)
            if value is not None:
                return value
    if default is REQUIRED:
        raise ValueError(f"missing required parameter {name} for tensor {tensor}")
    return default


def whole_model_slices(data: dict[str, Any], source: str) -> dict[str, Any]:
    """`slices:` with ONE slice (FuseChat's published SLERP config) → `models:`; the engine
    checks that each layer_range covers all layers. Other slice layouts are refused."""
    slices = data.get("slices")
    if "modules" in data or not isinstance(slices, list) or len(slices) != 1 or "models" in data \
            or not isinstance(slices[0], dict) or set(slices[0]) - {"sources"}:
        raise ConfigError(source, ["slices/modules: only one slice of whole models is supported; use `models`"])
    models = [{k: v for k, v in src.items() if k in ("model", "parameters", "layer_range")}
              for src in slices[0].get("sources") or [] if isinstance(src, dict)]
    return {**{k: v for k, v in data.items() if k != "slices"}, "models": models}


def parse_spec(data: dict[str, Any], source: str = "merge config") -> MergeSpec:
    """Validate a mergekit-style mapping; relative model paths stay as given.

    Raises:
        ConfigError: one line per bad field (unknown keys and methods named).
    """
    if isinstance(data, dict) and ("slices" in data or "modules" in data):
        data = whole_model_slices(data, source)
    try:
        return MergeSpec.model_validate(data).check()
    except ValidationError as err:
        raise ConfigError(source, format_errors(err)) from None
    except ValueError as err:
        raise ConfigError(source, [str(err)]) from None


def load_spec(path: str | Path) -> MergeSpec:
    """Read a mergekit-style YAML file; model paths relative to the file's directory resolve there."""
    path = Path(path)
    data = read_yaml_file(path, "merge config") or {}  # bounded; FileNotFoundError when missing
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["top level must be a mapping"])

    def local(p: Any) -> Any:
        try:
            return str((path.parent / p).resolve()) if isinstance(p, str) and (path.parent / p).exists() else p
        except (OSError, ValueError):  # a name too long, a NUL byte: not a local path; parse_spec says why
            return p

    def items(value: Any) -> list:
        return value if isinstance(value, list) else []

    for m in items(data.get("models")) or [src for sl in items(data.get("slices")) if isinstance(sl, dict)
                                           for src in items(sl.get("sources"))]:
        if isinstance(m, dict):
            m["model"] = local(m.get("model"))
    if "base_model" in data:
        data["base_model"] = local(data["base_model"])
    return parse_spec(data, str(path))
