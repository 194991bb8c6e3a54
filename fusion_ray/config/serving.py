"""The `serve` section (the OpenAI-compatible endpoint) and the `ray` section (which cluster).

`parallel_sizes` reads a vLLM engine's tensor × pipeline parallel sizes from `serve.engine_options`:
`ServeConfig` validates them with it, and `fusion_ray.placement` places a replica by them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fusion_ray import locations
from fusion_ray.config.models import Name, Strict, checks_files


def parallel_sizes(engine_options: dict[str, Any]) -> tuple[int, int]:
    """(tensor, pipeline) parallel sizes from `serve.engine_options`, both 1 when absent.

    Raises:
        ValueError: a size that is not a whole number ≥ 1, naming the key.
    """
    sizes = []
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        value = engine_options.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"engine_options.{key} must be a whole number ≥ 1, got {value!r}")
        sizes.append(value)
    return sizes[0], sizes[1]


class ServeConfig(Strict):
    """The OpenAI-compatible chat endpoint; `fusion_ray.serve.app.build_app` takes these keys."""

    engine: Literal["vllm", "hf"] = "vllm"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model_id: str | None = None  # the name clients send as `model`; default: the model dir's name
    api_key_env: str | None = None  # name of the env var holding the bearer token
    num_replicas: int = Field(1, ge=1)  # fixed replicas when min_replicas == max_replicas
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)  # per replica; vLLM batches what it holds
    num_cpus: float = Field(1, gt=0)  # per replica
    num_gpus: float = Field(0, ge=0)  # per replica; engine_options' TP × PP = n > 1: n GPUs (placement.py)
    accelerator_type: str | None = None
    max_tokens_cap: int = Field(2048, ge=1)
    # a request body over this is answered 413 before it is read (OpenAI JSON, text only)
    max_request_bytes: int = Field(4 * 2**20, ge=1024, le=2**30)
    # messages longer than this (characters) are answered 400 before templating; default:
    # max_model_len × the longest token of the vocabulary, a length no valid prompt reaches
    max_prompt_chars: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=16)  # default: the model's own context length
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    engine_options: dict[str, Any] = {}  # extra vLLM engine arguments (e.g. tensor_parallel_size)
    access_log: bool = True  # a log line per request from Serve's proxy and replica
    deploy_after_merge: bool = False  # `fusion-ray run` ends by serving the merged model
    # LoRA adapters served on the served model as their common base, each as one more model: the
    # name clients send as `model` (an arm's name) → an adapter dir (`train.peft` target or peft's
    # own) whose adapter_config.json names the served model; the base is loaded once
    adapters: dict[Name, str] = {}

    @model_validator(mode="after")
    def _replica_bounds(self) -> ServeConfig:
        if not self.min_replicas <= self.num_replicas <= self.max_replicas:
            raise ValueError(f"need min_replicas <= num_replicas <= max_replicas, got "
                             f"{self.min_replicas}, {self.num_replicas}, {self.max_replicas}")
        return self

    @model_validator(mode="after")
    def _parallel_sizes(self) -> ServeConfig:
        parallel_sizes(self.engine_options)  # a replica's GPUs follow them: whole numbers ≥ 1
        return self

    @field_validator("adapters")
    @classmethod
    def _absolute_adapters(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        return {name: locations.absolute(d) for name, d in v.items()} if checks_files(info) else v

    @model_validator(mode="after")
    def _adapter_names(self) -> ServeConfig:
        if self.model_id is not None and self.model_id in self.adapters:
            raise ValueError(f"serve.adapters: {self.model_id!r} is the base's model_id; give the adapter another name")
        return self


class RayConfig(Strict):
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray
    num_cpus: float | None = Field(None, gt=0)  # logical CPUs of a local Ray
