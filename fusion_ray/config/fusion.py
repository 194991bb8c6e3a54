"""`FusionConfig`, the whole pipeline's config, and how one is loaded: `load_config` (YAML plus
`a.b=c` overrides), `parse_config` (a mapping), the keys that moved, and the bound on its size."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from fusion_ray.config.evaluation import EvalConfig
from fusion_ray.config.explicit import AlignConfig, CollectConfig, DataConfig, FuseConfig, MergeConfig, TrainConfig
from fusion_ray.config.implicit import ImplicitConfig
from fusion_ray.config.models import CHECK_FILES, ModelSpec, Name, Strict, absolute_path, checks_files, local_vocab_size
from fusion_ray.config.serving import RayConfig, ServeConfig
from fusion_ray.config.stages import METHOD_STAGES, STAGE_DIRS
from fusion_ray.errors import ConfigError, format_errors, one_line
from fusion_ray.yamlfile import biggest_key, json_size, load_yaml, read_yaml_file


class FusionConfig(Strict):
    """The whole pipeline: models, data and every stage's settings."""

    name: Name
    workdir: str  # local path or pyarrow filesystem URI; every stage writes below it
    # explicit: FuseLLM / FuseChat (distil the sources' aligned distributions, then merge);
    # implicit: FuseChat-3.0 (sample the sources, score, SFT then DPO; `implicit` section)
    method: Literal["explicit", "implicit"] = "explicit"
    pivot: ModelSpec  # the target model; in implicit fusion, the model trained
    sources: list[ModelSpec] = Field(min_length=1)
    data: DataConfig = DataConfig()
    implicit: ImplicitConfig | None = None
    collect: CollectConfig = CollectConfig()
    align: AlignConfig = AlignConfig()
    fuse: FuseConfig = FuseConfig()
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()
    # dotted key → the relative local path the loaded config gave there (now absolute against the
    # directory it was loaded from); the driver's only: a config from the wire has none
    _relative_paths: dict[str, str] = PrivateAttr(default_factory=dict)

    def __eq__(self, other: object) -> bool:  # the fields: a config from the wire equals the driver's
        return self.__dict__ == other.__dict__ if isinstance(other, FusionConfig) else NotImplemented

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, v: str, info: ValidationInfo) -> str:
        return absolute_path(v, info)

    @model_validator(mode="after")
    def _method_has_its_inputs(self) -> FusionConfig:
        if self.method == "explicit" and not self.data.train:
            raise ValueError("data.train: the explicit method needs at least one training corpus")
        if self.method == "implicit" and self.implicit is None:
            raise ValueError("implicit: the implicit method needs this section (at least implicit.prompts)")
        chat = self.eval.chat
        if chat is not None and chat.questions is None:
            if self.method == "explicit":
                raise ValueError("eval.chat.questions: the explicit method's chat evaluation needs a question file")
            if not any(c.verify == "none" for c in self.implicit.heldout):
                raise ValueError("eval.chat.questions: without a question file, chat evaluation judges the "
                                 "answers to held-out prompts without a verifier, and implicit.heldout has none "
                                 "(verify: none)")
        return self

    @model_validator(mode="after")
    def _single_source_arms_are_sources(self) -> FusionConfig:
        if self.implicit is not None and self.implicit.single_source_arms:
            arms, names = self.implicit.single_source_arms, [s.name for s in self.sources]
            unknown = [a for a in arms if a not in names]
            if unknown:
                raise ValueError(f"implicit.single_source_arms: {', '.join(unknown)} not among the sources "
                                 f"({', '.join(names)})")
            if len(set(arms)) < len(arms):
                raise ValueError("implicit.single_source_arms: a source is named twice")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> FusionConfig:
        names = [self.pivot.name] + [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dup)}")
        return self

    @model_validator(mode="after")
    def _top_k_fits_vocab(self, info: ValidationInfo) -> FusionConfig:
        if checks_files(info):  # local models only: reads their config.json
            for model in self.models():
                vocab = local_vocab_size(model.path)
                if vocab is not None:
                    self.collect.check_top_k(model.name, vocab)
        return self

    def models(self) -> list[ModelSpec]:
        """The pivot first, then the sources (collect runs over all of them)."""
        return [self.pivot, *self.sources]

    def stages(self) -> tuple[str, ...]:
        """This config's method's stages, in order (`serve` last)."""
        return METHOD_STAGES[self.method]

    def stage_dir(self, stage: str, *parts: str) -> str:
        """Directory (or URI) of a stage's output: `stage_dir("collect", "pivot")` → `…/logits/pivot`."""
        if stage not in STAGE_DIRS:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_DIRS)}")
        return "/".join([self.workdir.rstrip("/"), STAGE_DIRS[stage], *parts])

    def world_size(self) -> int:
        return self.train.num_workers

    def source_pairs(self) -> list[tuple[str, str]]:
        """(pivot, source) per fused dataset: one per source in pairwise mode, one in total otherwise
        (the explicit method's; the implicit `pairs` stage makes preference pairs)."""
        if self.fuse.mode == "pairwise":
            return [(self.pivot.name, s.name) for s in self.sources]
        return [(self.pivot.name, "+".join(s.name for s in self.sources))]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_wire(self) -> dict[str, Any]:
        """The config as it crosses into Ray (task and actor arguments, Ray Data UDF and Ray Train
        loop configs): the whole config as a JSON-able dict, turned back by `from_wire`."""
        return self.to_dict()

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> FusionConfig:
        """The config `to_wire` sent, validated again where it arrives (a Ray worker); the
        file-system checks of `load_config` are not repeated (the paths may be the driver's)."""
        return cls.model_validate(data)

    def config_hash(self, *sections: str) -> str:
        """Stable hash of the whole config, or of the named top-level sections only."""
        data = self.to_dict()
        if sections:
            data = {k: data[k] for k in sections}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML.

    List items are addressed by index (`sources.0.path=...`).
    """
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError("overrides", [f"{one_line(repr(override[:200]))}: expected key=value"])
    value = load_yaml(raw, f"override {one_line(key, 80)}")
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not (part.isascii() and part.isdigit() and len(part) < 10) or int(part) >= len(node):
                raise ConfigError("overrides", [f"{key}: no list item {part!r}"])
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif last:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ConfigError("overrides", [f"{key}: {part!r} is not a section"])


# --- the config's own size -------------------------------------------------------------------
# The config is hashed, written beside every stage output and shipped to every Ray worker as
# JSON; one that is not JSON or over this size is refused at validation, not in `run`.
MAX_CONFIG_JSON_BYTES = 1 << 20


def _too_large(data: Any, source: str, size: int) -> ConfigError:
    where = biggest_key(data, MAX_CONFIG_JSON_BYTES)
    amount = f"{'at least ' if size > MAX_CONFIG_JSON_BYTES * 2 else ''}{size / 2**20:.1f} MiB"
    over = f"the config would be {amount} as JSON, over the {MAX_CONFIG_JSON_BYTES // 2**20} MiB bound on a config"
    return ConfigError(source, [f"{where}: too large: holds most of it ({over})" if where != "(top level)"
                                else f"too large: {over}; no one key holds most of it"])


def _check_serialisable(cfg: FusionConfig, source: str) -> None:
    """The config as `config_hash` and every manifest write it: JSON, within the bound."""
    try:
        blob = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    except (ValueError, TypeError, RecursionError) as err:  # PydanticSerializationError is a ValueError
        section = "(top level)"
        for name in FusionConfig.model_fields:
            try:
                json.dumps(cfg.model_dump(mode="json", include={name}), sort_keys=True)
            except (ValueError, TypeError, RecursionError):
                section = name
                break
        raise ConfigError(source, [f"{section}: cannot be written as JSON: {one_line(str(err), 200)}"]) from None
    if len(blob) > MAX_CONFIG_JSON_BYTES:
        raise _too_large(cfg.to_dict(), source, len(blob))


# keys that moved to another section: a config that still sets one is told where it went
MOVED_KEYS = {"collect.shard_rows": "data.shard_rows"}


def parse_config(data: dict[str, Any], source: str = "config") -> FusionConfig:
    """Validate a config mapping, checking its local paths (and local models' vocabularies).

    Raises:
        ConfigError: every bad field; or one line when the config is too large or not JSON.
    """
    size = json_size(data, 2 * MAX_CONFIG_JSON_BYTES)
    if size > MAX_CONFIG_JSON_BYTES:  # before validation walks it
        raise _too_large(data, source, size)
    try:
        cfg = FusionConfig.model_validate(data, context={CHECK_FILES: True})
    except ValidationError as err:
        raise ConfigError(source, format_errors(err, MOVED_KEYS)) from None
    _check_serialisable(cfg, source)
    cfg._relative_paths = _relative_paths(FusionConfig.model_validate(data).to_dict(), cfg.to_dict())
    return cfg


def _relative_paths(given: Any, loaded: Any, key: str = "") -> dict[str, str]:
    """Dotted key → the string `given` held where the loaded config holds another (a relative path
    the load made absolute)."""
    if isinstance(given, dict) and isinstance(loaded, dict):
        return {k2: v for k in given if k in loaded
                for k2, v in _relative_paths(given[k], loaded[k], f"{key}.{k}" if key else str(k)).items()}
    if isinstance(given, list) and isinstance(loaded, list):
        return {k2: v for i, (a, b) in enumerate(zip(given, loaded, strict=False))
                for k2, v in _relative_paths(a, b, f"{key}.{i}").items()}
    return {key: given} if isinstance(given, str) and given != loaded else {}


def load_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> FusionConfig:
    """Load a YAML config, apply `key=value` overrides and validate.

    Raises:
        ConfigError: listing every bad field with its dotted path.
        FileNotFoundError: the config file is missing.
    """
    path = Path(path)
    data = read_yaml_file(path, "config file") or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["top level must be a mapping"])
    for item in overrides:
        apply_override(data, item)
    return parse_config(data, str(path))
