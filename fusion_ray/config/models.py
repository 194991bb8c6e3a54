"""What every section builds on: the `Strict` base, the location checks of a config's paths,
and the models (`ModelSpec`, with its `ModelArch` and `SamplingSpec`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fusion_ray import locations
from fusion_ray.yamlfile import MAX_YAML_BYTES

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]


# Checks that read the file system (a local path exists, a local model's vocabulary) run
# once, when a config is loaded (`parse_config`, `load_config`): they run only when the
# validation context holds `CHECK_FILES`. Validating again elsewhere (`FusionConfig.from_wire`
# on a Ray worker, `FusionConfig(...)` in code) checks the values alone and touches nothing.
CHECK_FILES = "check_files"


def checks_files(info: ValidationInfo) -> bool:
    """Whether this validation is the load-time one that may read the file system."""
    return bool(info.context and info.context.get(CHECK_FILES))


def check_location(value: str, *, kind: str) -> str:
    """Accept a demo asset, URI or hub id; a local path must exist (`locations.check`), and comes
    back absolute (against the working directory: see `absolute_path`).

    Raises:
        ValueError: naming the path, when it is local and missing.
    """
    return locations.absolute(locations.check(value, what=kind))


def absolute_path(value: str | None, info: ValidationInfo) -> str | None:
    """A local path of the config made absolute where the config is loaded (the driver, against
    the directory the command runs from); elsewhere (`from_wire` on a worker) as it is. Every
    local path of a config goes through this or `check_location`: a Ray worker's working
    directory is its own, so a relative path read there names another file."""
    return value if value is None or not checks_files(info) else locations.absolute(value, path_only=True)


def local_vocab_size(path: str) -> int | None:
    """`vocab_size` from a local model dir's config.json; None for hub ids and demo assets."""
    config = Path(path).expanduser() / "config.json"
    try:
        if locations.kind(path) != "local" or not config.is_file() or config.stat().st_size > MAX_YAML_BYTES * 16:
            return None
        data = json.loads(config.read_bytes())
    except (OSError, ValueError, RecursionError):  # unreadable: loading the model will say why
        return None
    vocab = data.get("vocab_size") if isinstance(data, dict) else None
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelArch(Strict):
    """A model's architecture numbers, for `fusion-ray plan` (fusion_ray/plan.py) where the model's
    config.json cannot be read (offline, not in the HF cache). config.json wins where both exist;
    plan names any field where they disagree. Never used to run anything.
    """

    params_b: float | None = Field(None, gt=0)  # total parameters, billions; default: counted from the shape
    hidden_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)  # attention (query) heads
    num_kv_heads: int | None = Field(None, ge=1)  # key/value heads (GQA); default: num_heads
    head_dim: int | None = Field(None, ge=1)  # default: hidden_size / num_heads
    vocab_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)  # MLP width (per expert)
    num_experts: int = Field(1, ge=1)  # MoE experts per layer (Mixtral: 8); 1 = dense
    mlp: Literal["gated", "plain"] = "gated"  # gated: 3 matrices (SwiGLU: Llama, Mistral); plain: 2 (GPT-2)
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = Field(None, ge=1)


class SamplingSpec(Strict):
    """How a source samples (FuseChat-3.0: 0.8 / 0.95; Qwen 0.7 / 0.8 with repetition penalty 1.05)."""

    temperature: float = Field(0.8, ge=0, le=10)
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    max_tokens: int = Field(1024, ge=1, le=1 << 17)


class ModelSpec(Strict):
    """A chat model: the pivot or one source."""

    name: Name
    path: str
    tokenizer: str | None = None  # defaults to `path`
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    domain: str | None = None  # the domain a source specialises in (for the report)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=16)
    arch: ModelArch | None = None  # planning only: not part of any stage's fingerprint
    sampling: SamplingSpec | None = None  # implicit fusion: this source's sampling (default: implicit.sampling)

    @field_validator("path", "tokenizer")
    @classmethod
    def _exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v is None or not checks_files(info) else check_location(v, kind="model")
