"""One typed configuration for the whole pipeline.

`FusionConfig` is a pydantic v2 model that rejects unknown keys. It is loaded from
YAML plus dotted `a.b=c` overrides (`load_config`), passed whole to every stage and
written beside every stage output. Each section holds the settings of the stage that
uses them. Values that follow from others (stage directories, world size, gradient
accumulation, an arm's λ) are methods, not keys. It crosses into Ray one way: whole, as
the dict `to_wire()` gives, validated again on the worker by `from_wire()`.

Model and corpus paths are one of: a local path (must exist; checked once, by
`load_config` / `parse_config`, never again on a worker), a hub id
(`org/name`, checked only when loaded or by `fusion-ray validate`), an object-store
URI (`s3://...`), or `demo:NAME`, an asset of the embedded default; `fusion_ray.locations`
says which and turns each into a local dir where a library needs one.

The modules, by what changes together (import from `fusion_ray.config`, which re-exports them):

- `stages`: each method's stages, in order, and their output directories;
- `models`: the `Strict` base, the location checks, `ModelSpec` (`ModelArch`, `SamplingSpec`);
- `explicit`: the explicit method's sections (data, collect, align, fuse, train with tracking
  and peft, merge);
- `evaluation`: the `eval` section (endpoints, the chat judge, chat eval, lm-eval);
- `serving`: the `serve` and `ray` sections, and `parallel_sizes`;
- `implicit`: the implicit method's section (prompts, reward model, sandbox, pairs, DPO);
- `fusion`: `FusionConfig`, overrides, moved keys, `parse_config` / `load_config`, the size bound.

YAML is read by `fusion_ray.yamlfile` (bounded; also for merge specs and cluster configs).
This package imports neither torch, ray nor transformers.
"""

from fusion_ray.config.evaluation import ChatEvalConfig, Endpoint, EvalConfig, JudgeConfig, LmEvalConfig
from fusion_ray.config.explicit import (
    ENV_NAME,
    MERGE_METHODS,
    AlignConfig,
    CollectConfig,
    CorpusSpec,
    DataConfig,
    FuseConfig,
    MergeConfig,
    MergeMethodName,
    ParamValue,
    PeftSettings,
    TrackingConfig,
    TrainConfig,
)
from fusion_ray.config.fusion import (
    MAX_CONFIG_JSON_BYTES,
    MOVED_KEYS,
    FusionConfig,
    apply_override,
    load_config,
    parse_config,
)
from fusion_ray.config.implicit import (
    DPOConfig,
    ImplicitConfig,
    PairsConfig,
    PromptCorpus,
    RewardModelConfig,
    SandboxConfig,
)
from fusion_ray.config.models import (
    CHECK_FILES,
    ModelArch,
    ModelSpec,
    Name,
    SamplingSpec,
    Strict,
    absolute_path,
    check_location,
    checks_files,
    local_vocab_size,
)
from fusion_ray.config.serving import RayConfig, ServeConfig, parallel_sizes
from fusion_ray.config.stages import ALL_STAGES, IMPLICIT_STAGES, METHOD_STAGES, STAGE_DIRS, STAGES
from fusion_ray.errors import ConfigError, bounded_repr, format_errors, one_line
from fusion_ray.yamlfile import (
    MAX_YAML_BYTES,
    MAX_YAML_CHARS,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    biggest_key,
    json_size,
    load_yaml,
    read_yaml_file,
)

__all__ = [
    # stages
    "ALL_STAGES", "IMPLICIT_STAGES", "METHOD_STAGES", "STAGES", "STAGE_DIRS",
    # models
    "CHECK_FILES", "ModelArch", "ModelSpec", "Name", "SamplingSpec", "Strict", "absolute_path", "check_location",
    "checks_files", "local_vocab_size",
    # explicit
    "ENV_NAME", "MERGE_METHODS", "AlignConfig", "CollectConfig", "CorpusSpec", "DataConfig", "FuseConfig",
    "MergeConfig", "MergeMethodName", "ParamValue", "PeftSettings", "TrackingConfig", "TrainConfig",
    # evaluation
    "ChatEvalConfig", "Endpoint", "EvalConfig", "JudgeConfig", "LmEvalConfig",
    # serving
    "RayConfig", "ServeConfig", "parallel_sizes",
    # implicit
    "ImplicitConfig", "PairsConfig", "DPOConfig", "PromptCorpus", "RewardModelConfig", "SandboxConfig",
    # fusion
    "MAX_CONFIG_JSON_BYTES", "MOVED_KEYS", "FusionConfig", "apply_override", "load_config", "parse_config",
    # fusion_ray.errors
    "ConfigError", "bounded_repr", "format_errors", "one_line",
    # fusion_ray.yamlfile
    "MAX_YAML_BYTES", "MAX_YAML_CHARS", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "biggest_key", "json_size", "load_yaml",
    "read_yaml_file",
]
