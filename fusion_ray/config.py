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

This module imports neither torch, ray nor transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fusion_ray import locations
from fusion_ray.errors import ConfigError, bounded_repr, format_errors, one_line  # noqa: F401 (bounded_repr: re-exported)
from fusion_ray.merge.registry import METHODS as MERGE_METHODS  # pure Python, no torch
from fusion_ray.yamlfile import (  # noqa: F401 (MAX_YAML_*, load_yaml: re-exported)
    MAX_YAML_BYTES,
    MAX_YAML_CHARS,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    biggest_key,
    json_size,
    load_yaml,
    read_yaml_file,
)

STAGES = ("prepare", "collect", "align", "fuse", "train", "merge", "eval", "serve")
# Implicit fusion (FuseChat-3.0, `method: implicit`): the sources' sampled responses, scored,
# make SFT rows and DPO pairs for the target (the pivot). Built so far: `sample`, `reward`, `pairs`, `sft`, `dpo`.
IMPLICIT_STAGES = ("sample", "reward", "pairs", "sft", "dpo", "eval")
METHOD_STAGES = {"explicit": STAGES, "implicit": IMPLICIT_STAGES}
ALL_STAGES = tuple(dict.fromkeys(STAGES + IMPLICIT_STAGES))
# Output directory of each stage below `workdir`.
STAGE_DIRS = {"prepare": "prepared", "collect": "logits", "align": "aligned", "fuse": "fused",
              "train": "targets", "merge": "merged", "eval": "report", "serve": "serve",
              "sample": "samples", "reward": "rewards", "pairs": "pairs", "sft": "sft", "dpo": "dpo"}
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


class CorpusSpec(Strict):
    """One chat corpus file or dataset: JSONL, Parquet, an on-disk HF dataset or a hub id."""

    path: str
    format: Literal["auto", "sharegpt", "openai"] = "auto"
    domain: str = "general"
    split: str = "train"
    max_rows: int | None = Field(None, ge=1)

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str, info: ValidationInfo) -> str:
        return check_location(v, kind="corpus") if checks_files(info) else v


class DataConfig(Strict):
    train: list[CorpusSpec] = []  # the explicit pipeline needs at least one (`FusionConfig` checks)
    heldout: list[CorpusSpec] = []
    max_length: int = Field(2048, ge=16)  # pivot tokens; longer texts are truncated and counted
    seed: int = 0
    # rows per prepared shard: prepare writes them, and every later stage keeps shard i of its
    # output to the same samples (the unit of work and of resuming)
    shard_rows: int = Field(1000, ge=1)


class CollectConfig(Strict):
    engine: Literal["vllm", "hf"] = "vllm"
    top_k: int = Field(10, ge=1, le=1024)
    batch_size: int = Field(16, ge=1)
    concurrency: int = Field(1, ge=1)  # engine actors per model
    # GPUs of a one-device engine (fractions allowed; 0: none); a vLLM engine of tensor × pipeline
    # parallel size n > 1 gets n whole GPUs (`fusion_ray.placement`)
    num_gpus_per_actor: float = Field(0, ge=0)
    num_cpus_per_actor: float = Field(1, gt=0)
    scored_only: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    accelerator_type: str | None = None  # e.g. "A100": engine actors only on nodes of that type
    # models collected at the same time (one Ray Data pipeline each); None: all of them, Ray
    # queues the engine actors that do not fit; 1: one model after the other
    max_concurrent_models: int | None = Field(None, ge=1)

    def check_top_k(self, model: str, vocab: int) -> None:
        """`top_k` must fit a model's vocabulary (checked at load for local models, by collect's
        preflight for every tokenizer).

        Raises:
            ValueError: naming the model and its vocabulary size.
        """
        if self.top_k > vocab:
            raise ValueError(f"collect.top_k={self.top_k} exceeds the vocabulary of model {model!r} ({vocab} tokens)")


class AlignConfig(Strict):
    dtw_fallback: bool = True
    tie_break: Literal["fusellm", "fusechat2"] = "fusechat2"
    # where a source distribution is transferred: only at 1-1 tokens (FuseLLM/FuseChat), or
    # at every pivot position a source token starts at or covers (`spans`, align/spans.py)
    positions: Literal["one_to_one", "spans"] = "spans"
    # `spans`, a pivot token starting inside a source token: the source's candidates that
    # continue the written prefix, divided by their own sum (`renormalize`), or by it plus
    # the row's tail mass (`tail`, an upper bound on p(prefix)), or not transferred (`skip`);
    # `exact`: collect stores the source's exact mass of the tokens extending the prefix and
    # their top-k (engines/conditioned.py), and align divides by that mass
    # (`label`: an ablation for the quality bench, one-hot on the written token's pivot piece).
    # `renormalize` (with `gold`) is the default; `exact` carries the source's information but
    # gains less, so it is opt-in (measured: bench/RESULTS.md, "Inside a source token: the gold
    # teacher, the label-only ablation and the exact teacher")
    prefix: Literal["renormalize", "tail", "skip", "exact", "label"] = "renormalize"
    # `spans`, conditioned or expanded positions: add the source's gold token with its exact
    # log-prob (collected as `gold_logprob`) where the top-k lacks it
    gold: bool = True
    # source id → pivot id: `first_piece` is the first token of the pivot's own tokenization
    # of the source token's text (what `spans` marginalises with, and so the only map it takes);
    # default: `first_piece` with `positions: spans`, `statistics` (FuseChat-2) with `one_to_one`
    vocab_map: Literal["exact", "mined", "statistics", "first_piece"] = "first_piece"
    fallback: Literal["pivot", "onehot_next"] = "pivot"
    # statistics map, source tokens never co-aligned in the corpus: the `mined` choice
    # (default), dropped into the tail, or the pivot's unk/eos (the reference)
    unseen: Literal["mined", "drop", "unk"] = "mined"
    workers: int = Field(2, ge=1)  # aligner actors (at most) that align shards in parallel
    num_cpus: float = Field(1, gt=0)  # per aligner actor

    @model_validator(mode="before")
    @classmethod
    def _default_map(cls, data: Any) -> Any:
        if isinstance(data, dict) and "vocab_map" not in data and data.get("positions") == "one_to_one":
            return {**data, "vocab_map": "statistics"}
        return data

    @model_validator(mode="after")
    def _one_semantics(self) -> AlignConfig:
        if self.prefix == "exact" and self.positions != "spans":
            raise ValueError("prefix 'exact' conditions split-word positions, which only positions 'spans' reaches")
        if self.positions == "spans" and self.vocab_map != "first_piece":
            raise ValueError(f"vocab_map {self.vocab_map!r} does not go with positions 'spans': spans marginalises "
                             "every source candidate through the pivot's own tokenization of it (first_piece) at "
                             "the positions it conditions, and one map must serve them all; use vocab_map "
                             "first_piece, or positions one_to_one for the FuseChat-style maps")
        return self


class FuseConfig(Strict):
    strategy: Literal["min_ce", "avg_ce"] = "min_ce"
    metric: Literal["ce", "bpb"] = "ce"
    mode: Literal["pairwise", "multi"] = "pairwise"
    num_cpus: float = Field(1, gt=0)  # per fuse task (one shard each; Ray Data runs as many as fit)


ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# tracking settings that belong to one backend (the others are shared)
_MLFLOW_ONLY = ("tracking_uri", "tracking_uri_env")
_WANDB_ONLY = ("entity", "mode", "dir")
_SECRET_QUERY = ("token", "key", "secret", "password", "passwd", "auth", "signature", "credential")


class TrackingConfig(Strict):
    """Experiment tracking of every training run (`trainer/tracking.py`): one run per arm, through
    Ray Train's MLflow or W&B integration on rank 0. `train.tracking: mlflow` is short for
    `train.tracking: {backend: mlflow}`. Secrets never come from here: MLflow reads its token,
    user and password (MLFLOW_TRACKING_TOKEN, _USERNAME, _PASSWORD) and W&B its key
    (WANDB_API_KEY) from the environment, and a URI that is itself secret comes from the env
    var `tracking_uri_env` names. Not part of any fingerprint: tracking does not change what
    is trained."""

    backend: Literal["none", "mlflow", "wandb"] = "none"
    # MLflow experiment / W&B project; default: the config's `name`
    experiment: str | None = Field(None, min_length=1, max_length=256)
    # each arm's run is `<run_name>-<stage>-<target>`; default: the config's `name`
    run_name: str | None = Field(None, min_length=1, max_length=200)
    tags: dict[str, str] = {}  # on every run (MLflow tags, W&B tags as `key:value`)
    # MLflow: a server URL, `sqlite:///…`, `databricks`, or a local dir (MLflow's file store),
    # without credentials; default: the URI in `tracking_uri_env`, else MLFLOW_TRACKING_URI in
    # the worker's environment, else `<workdir>/mlruns` when the workdir is local
    tracking_uri: str | None = Field(None, min_length=1, max_length=2048)
    tracking_uri_env: str | None = Field(None, pattern=ENV_NAME, max_length=128)
    entity: str | None = Field(None, min_length=1, max_length=128)  # W&B team or user
    # W&B: online, or offline (files under `dir`, uploaded later with `wandb sync`)
    mode: Literal["online", "offline"] = "online"
    dir: str | None = None  # W&B writes its `wandb/` dir here; default: the workdir when it is local
    # one request to the tracking server; an unreachable one costs at most about
    # timeout_s × (max_retries + 1) once, then tracking is off for the run
    timeout_s: int = Field(10, ge=1, le=600)
    max_retries: int = Field(1, ge=0, le=10)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"backend": data} if isinstance(data, str) else data

    @field_validator("dir")
    @classmethod
    def _absolute_dir(cls, v: str | None, info: ValidationInfo) -> str | None:
        return absolute_path(v, info)

    @field_validator("tracking_uri")
    @classmethod
    def _absolute_file_store(cls, v: str | None, info: ValidationInfo) -> str | None:
        # a plain local dir is MLflow's file store; a scheme (`http:`, `sqlite:`, `file:`) or
        # `databricks` is not a path of ours
        local = v is not None and ":" not in v and not v.startswith("databricks")
        return absolute_path(v, info) if local else v

    @model_validator(mode="after")
    def _settings_of_the_backend(self) -> TrackingConfig:
        # settings away from their defaults (not `model_fields_set`: the wire form sets every field)
        given = {k for k, f in type(self).model_fields.items()
                 if k != "backend" and getattr(self, k) != f.get_default(call_default_factory=True)}
        if self.backend == "none" and given:
            raise ValueError(f"{', '.join(sorted(given))} set, but backend is none (tracking off): set "
                             f"train.tracking.backend to mlflow or wandb")
        foreign = [k for k in (_WANDB_ONLY if self.backend == "mlflow" else _MLFLOW_ONLY if self.backend == "wandb"
                               else ()) if k in given]
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: not a setting of backend {self.backend}")
        if self.tracking_uri and self.tracking_uri_env:
            raise ValueError("tracking_uri and tracking_uri_env both set: give one")
        if self.tracking_uri and _has_credentials(self.tracking_uri):  # checked here: the error shows no value
            raise ValueError("tracking_uri must not carry credentials (user:password@ or a token in the query): "
                             "put the URI in an env var named by tracking_uri_env, or the credentials in "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN")
        return self


def _has_credentials(uri: str) -> bool:
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(uri)
    try:
        userinfo = parts.username is not None or parts.password is not None
    except ValueError:  # a malformed authority
        userinfo = "@" in parts.netloc
    return userinfo or any(w in k.lower() for k, _ in parse_qsl(parts.query) for w in _SECRET_QUERY)


class PeftSettings(Strict):
    """`train.peft`: LoRA adapters (peft) instead of full fine-tuning. Only the adapters train; the
    target is an adapter dir (plus, with `save_merged`, a dense HF model dir in `merged/` below it)."""

    rank: int = Field(16, ge=1, le=4096)  # r: the inner dimension of B @ A
    alpha: float = Field(32, gt=0)  # the update is (alpha / rank) · B @ A
    # names of the modules that get adapters (the last part of a module's name, e.g. q_proj, or a
    # dotted suffix); "all-linear": every linear layer but the output head. Checked at model load.
    target_modules: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.]+$", max_length=128)]] | Literal[
        "all-linear"] = "all-linear"
    dropout: float = Field(0.0, ge=0, lt=1)  # on the adapters' input
    save_merged: bool = False  # also write base + adapter as ordinary dense weights (`merged/`)
    # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA GPUs only; strategy ddp)
    quantize: Literal["4bit"] | None = None

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, v):
        if isinstance(v, list) and (not v or len(set(v)) < len(v)):
            raise ValueError("name at least one module, each once (or \"all-linear\")")
        return v


class TrainConfig(Strict):
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    accelerator_type: str | None = None  # e.g. "A100": training workers only on nodes of that type
    # arms trained at the same time (one TorchTrainer each); None: all of them, an arm whose
    # workers do not fit waits (Ray Train retries its start); 1: one arm after the other
    max_concurrent_arms: int | None = Field(None, ge=1)
    lambda_clm: float = Field(0.9, ge=0, le=1)
    # distillation temperature: student and teacher softened, the fusion term × T² (Hinton);
    # 1 is the plain cross-entropy (trainer/losses.py says why not the teacher alone)
    temperature: float = Field(1.0, gt=0)
    tail: Literal["bucket", "renormalize"] = "bucket"
    # positions that get the fusion term: every scored one (FuseChat), or only those a
    # source's distribution reached (elsewhere the teacher is the pivot's own fallback)
    fusion_positions: Literal["all", "transferred"] = "all"
    lr: float = Field(5e-6, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1)
    global_batch_size: int = Field(128, ge=1)
    micro_batch_size: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    bf16: bool = True
    # recompute each layer's activations in the backward pass (keeps one layer's input per layer):
    # much less memory for ≈ 1/3 more compute; does not change what is trained
    gradient_checkpointing: bool = False
    # where the λ·CLM + (1−λ)·fusion loss starts (trainer/losses.py `batch_loss`): `hidden` takes the
    # last hidden state and the LM head and computes the logits chunk by chunk inside the loss
    # (forward and backward), so the [micro_batch, seq, vocab] logits never exist; `logits` takes
    # the model's logits. Equal in value and gradient. `hidden` is the default because training at
    # scale runs on GPUs, where it is the faster path at about the same peak memory; on CPU it is no
    # faster, slower at a large vocabulary, and its fixed chunk buffers make it smaller only when
    # micro_batch x seq is large (docs/design.md, "Training memory"; `fusion-ray plan` shows both).
    # Measured: bench/RESULTS.md, "bench/gpu_train_check.py — the fusion loss from hidden states, on
    # one H200" (GPU) and "bench/train.py (b) — the loss from hidden states on CPU".
    # Models the hidden path cannot serve (soft-capped logits as Gemma-2's, a LoRA-wrapped head) use
    # the logits; under ZeRO-3 the loss runs as the head module's forward, which gathers its weight.
    loss_from: Literal["hidden", "logits"] = "hidden"
    # the hidden-state loss's chunk, in MiB of float32 [rows, vocab] logits (trainer/losses.py
    # `combined_loss_from_hidden`); None: its default, 128 MiB (a large matmul M for the GPU).
    # Smaller saves memory (a [chunk, V] buffer in forward and backward) at some speed, most on
    # CPU; it never changes the loss or its gradient. Ignored when the loss runs from logits.
    loss_chunk_mb: int | None = Field(None, ge=1, le=4096)
    # pack short conversations, in the row order's sequence, into rows of up to data.max_length
    # tokens (attention and position ids restart per conversation; the loss is the unpacked one on
    # the same rows). micro_batch_size and global_batch_size then count packed rows, and an epoch is
    # its packed rows (trainer/order.py). The fused/SFT objective only: DPO pairs train unpacked.
    packing: bool = False
    seed: int = 42
    checkpoint_every: int = Field(100, ge=1)
    # steps between metric reports to Ray: each report synchronises the workers, so report sparingly
    # (measured: bench/RESULTS.md, "Findings moved from code comments")
    report_every: int = Field(10, ge=1)
    max_failures: int = Field(1, ge=0)
    clm_only_arm: bool = False
    resume_from: str | None = None  # a checkpoint dir of an earlier run of this config
    shuffle: bool = True  # a seeded random shuffle of the fused rows (they come grouped by corpus)
    # rows shuffled together (files in a seeded order, then rows inside windows of this many):
    # a worker holds one file plus window/num_workers rows of it (trainer/order.py)
    shuffle_window_rows: int = Field(8192, ge=1)
    # experiment tracking (MLflow or W&B) of every arm's run; never changes or stops training
    tracking: TrackingConfig = TrackingConfig()
    peft: PeftSettings | None = None  # None: full fine-tuning; else LoRA adapters (see PeftSettings)

    @field_validator("resume_from")
    @classmethod
    def _absolute_resume(cls, v: str | None, info: ValidationInfo) -> str | None:
        return absolute_path(v, info)

    @model_validator(mode="after")
    def _qlora_on_ddp(self) -> TrainConfig:
        if self.peft is not None and self.peft.quantize and (self.strategy != "ddp" or not self.use_gpu):
            raise ValueError("peft.quantize: 4bit (QLoRA) needs strategy ddp and use_gpu: true "
                             f"(this config: strategy {self.strategy}, use_gpu {str(self.use_gpu).lower()})")
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size × num_workers = {per_step}"
            )
        return self

    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)

    def lambda_for(self, arm: str) -> float:
        """λ of the arm's loss λ·CLM + (1−λ)·fusion: 1 (CLM alone) for the `clm_only` arm and for
        implicit fusion's `sft` (CLM on the chosen responses)."""
        return 1.0 if arm in ("clm_only", "sft") else self.lambda_clm


MergeMethodName = Literal[tuple(MERGE_METHODS)]  # every method of fusion_ray.merge.registry
ParamValue = float | int | bool | str | list[float]


class MergeConfig(Strict):
    method: MergeMethodName = "sce"
    variant: Literal["fusechat", "mergekit"] = "fusechat"
    parameters: dict[str, ParamValue] = {}
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    out_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    seed: int = 0
    num_actors: int = Field(1, ge=1)
    shard_size_mb: int = Field(2000, ge=1)

    @model_validator(mode="after")
    def _known_parameters(self) -> MergeConfig:
        known = MERGE_METHODS[self.method].parameters()
        unknown = sorted(set(self.parameters) - known)
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for merge method {self.method}; "
                             f"known: {', '.join(sorted(known)) or 'none'}")
        return self


class Endpoint(Strict):
    """Any OpenAI-compatible endpoint (our served model included): base URL (…/v1), model name and
    the name of the env var holding its key (the key itself is never in a config)."""

    url: str = Field(pattern=r"^https?://", max_length=2048)
    model: str = Field(min_length=1, max_length=256)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class JudgeConfig(Endpoint):
    """The LLM judge of chat evaluation (`eval.chat.judge`).

    `single`: MT-Bench-style grading 1–10 of each answer turn (against the question's reference
    answer in `reference_categories`); `pairwise`: each arm against `baseline`, both orders
    (inconsistent verdicts count as ties), with a length-controlled win rate. Every call's prompt
    and output is saved under the eval dir, so a rerun re-scores from them with no calls."""

    modes: list[Literal["single", "pairwise"]] = Field(["single"], min_length=1)
    baseline: str = "pivot"  # pairwise: the arm every other arm is compared with
    samples: int = Field(1, ge=1, le=16)  # judge samples per item (use temperature > 0 for > 1)
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(512, ge=1, le=8192)  # of each judge reply
    concurrency: int = Field(8, ge=1, le=256)  # judge calls in flight
    max_retries: int = Field(4, ge=0, le=20)  # per call, after a 429/5xx/timeout/connection error
    backoff_s: float = Field(1.0, ge=0, le=600)  # first retry's wait, doubled each time, with jitter
    timeout_s: float = Field(120, gt=0, le=3600)  # per call
    max_calls: int = Field(10_000, ge=1)  # budget: calls (retries included) past it are not made
    reference_categories: list[str] = ["math", "reasoning", "coding"]
    bootstrap: int = Field(1000, ge=0, le=100_000)  # resamples of the questions for 95 % intervals
    seed: int = 0


class ChatEvalConfig(Strict):
    """Chat evaluation (`eval.chat`): every chosen arm answers a question file (MT-Bench's
    question.jsonl reads as is: `question_id`, `category`, `turns`, optional `reference`), turn by
    turn (a later turn sees the arm's own earlier answers), as a Ray Data pass per arm; then the
    optional judge grades the answers."""

    questions: str  # JSONL; a local path, store URI or demo asset
    # arm names (a name ending in ":" picks every arm it prefixes); None: the pivot and every trained arm
    arms: list[str] | None = None
    endpoints: dict[Name, Endpoint] = {}  # more arms, each answered by an OpenAI-compatible endpoint
    engine: Literal["vllm", "hf"] = "vllm"
    sampling: SamplingSpec = SamplingSpec(temperature=0.0, top_p=1.0, max_tokens=1024)
    seed: int = 0
    batch_size: int = Field(16, ge=1, le=4096)  # questions per Ray Data batch
    concurrency: int = Field(1, ge=1)  # engine actors per arm (endpoint arms: requests in flight)
    num_cpus: float = Field(1, gt=0)  # per engine actor
    num_gpus: float = Field(0, ge=0)  # per engine actor
    max_questions: int | None = Field(None, ge=1)
    max_turns: int = Field(8, ge=1, le=64)  # a question with more turns is an error naming its row
    judge: JudgeConfig | None = None

    @field_validator("questions")
    @classmethod
    def _exists(cls, v: str, info: ValidationInfo) -> str:
        return check_location(v, kind="corpus") if checks_files(info) else v


class LmEvalConfig(Strict):
    """lm-evaluation-harness tasks (`eval.lm_eval`), against model dirs of arms (its `hf` model)
    and/or an OpenAI-compatible endpoint (its `local-chat-completions` model)."""

    tasks: list[str] = Field(min_length=1)
    include_path: str | None = None  # a dir of local task YAMLs (offline tasks)
    arms: list[str] = []  # arm names whose model dir lm-eval loads
    endpoint: Endpoint | None = None  # e.g. our served model
    limit: int | None = Field(None, ge=1)  # items per task
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, ge=1)
    apply_chat_template: bool = True
    num_cpus: float = Field(1, gt=0)  # per Ray task (one per arm)
    num_gpus: float = Field(0, ge=0)  # per model-dir task: on a GPU it runs there (bf16 where the model is)

    @model_validator(mode="after")
    def _something_to_run(self) -> LmEvalConfig:
        if not self.arms and self.endpoint is None:
            raise ValueError("eval.lm_eval needs arms (model dirs) or an endpoint")
        return self

    @field_validator("include_path")
    @classmethod
    def _exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v is None or not checks_files(info) else check_location(v, kind="corpus")


class EvalConfig(Strict):
    max_rows_per_domain: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    num_cpus: float = Field(1, gt=0)  # per arm-scoring Ray task
    chat: ChatEvalConfig | None = None  # answers to a question file, graded by an LLM judge
    lm_eval: LmEvalConfig | None = None
    # implicit fusion: the longest greedy answer an arm gives a held-out prompt
    max_new_tokens: int = Field(512, ge=1, le=1 << 17)


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


class PromptCorpus(Strict):
    """Prompts for implicit fusion: JSONL or Parquet rows `{id, messages | prompt, answer?, tests?}`.

    `verify` says how a response to these prompts is checked before the reward model counts:
    `math` (its final answer against `answer`), `code` (run against `tests` in the sandbox) or
    `none` (open prompts: the reward model alone).
    """

    path: str
    domain: str = "general"
    verify: Literal["none", "math", "code"] = "none"
    max_rows: int | None = Field(None, ge=1)
    samples: int | None = Field(None, ge=1, le=64)  # responses per prompt and source; None: implicit.samples

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str, info: ValidationInfo) -> str:
        return check_location(v, kind="corpus") if checks_files(info) else v


class RewardModelConfig(Strict):
    """The reward model of implicit fusion (FuseChat-3.0: ArmoRM-Llama3-8B-v0.1)."""

    path: str
    revision: str | None = None
    trust_remote_code: bool = False  # ArmoRM's own head needs it: turn on only for a model you trust
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int = Field(4096, ge=16)  # tokens of prompt + response scored (the end kept)
    batch_size: int = Field(8, ge=1)
    concurrency: int = Field(1, ge=1)  # scorer actors
    num_cpus_per_actor: float = Field(1, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0)

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str, info: ValidationInfo) -> str:
        return check_location(v, kind="model") if checks_files(info) else v


class SandboxConfig(Strict):
    """How a code response is run against its tests (`reward/sandbox.py`, `reward/judge.py`):
    the limits of each sandboxed process, and the isolation. `bwrap` (bubblewrap) is the only
    boundary; `unsafe-in-process` is the old in-process guard, which a hostile candidate can fool
    (`reward/guard.py`), for tests only."""

    cpu_seconds: int = Field(5, ge=1, le=600)
    wall_seconds: float = Field(10, gt=0, le=1200)
    memory_mb: int = Field(512, ge=64, le=65536)
    file_mb: int = Field(1, ge=1, le=1024)
    output_kb: int = Field(64, ge=1, le=65536)
    processes: int = Field(32, ge=1, le=4096)
    isolation: Literal["bwrap", "unsafe-in-process"] = "bwrap"
    uid: int = Field(65534, ge=1, le=2**31 - 1)  # the host uid a root verifier drops to (never root)
    python: str | None = None  # the sandbox's interpreter (None: this one if it runs there, else /usr/bin/python3)
    packages: list[str] = []  # modules a test may import, bound read-only (e.g. numpy)


class PairsConfig(Strict):
    """How scored samples become SFT rows and DPO pairs (`pairs/rules.py` says the rules)."""

    dpo_fraction: float = Field(0.5, ge=0, le=1)  # prompts that go to DPO; the rest to SFT
    min_gap: float = Field(0.01, ge=0)  # open prompts: reward(chosen) − reward(rejected) within [min, max]
    max_gap: float = Field(0.1, ge=0)  # (FuseChat-3.0 with ArmoRM: [0.01, 0.1])
    per_prompt: Literal["one", "all"] = "one"  # one pair per prompt (the best source's), or one per source
    seed: int = 0  # of the SFT/DPO prompt split

    @model_validator(mode="after")
    def _gap_range(self) -> PairsConfig:
        if self.min_gap > self.max_gap:
            raise ValueError(f"min_gap {self.min_gap} is above max_gap {self.max_gap}")
        return self


class PreferenceConfig(Strict):
    """The `dpo` stage's loss (`trainer/preference.py`) and the training settings it changes.

    FuseChat-3.0: length-normalised DPO with β = 10 for Llama-3.1-8B targets; plain (sigmoid)
    DPO with β = 0.01 for Qwen-2.5 and Gemma-2 targets. Everything else comes from `train`.
    """

    loss: Literal["sigmoid", "length_normalized", "ipo", "simpo"] = "sigmoid"
    beta: float = Field(0.01, gt=0, le=1000)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    gamma_beta_ratio: float = Field(0.5, ge=0)  # SimPO's target margin γ / β
    # α of an NLL term on the chosen responses (RPO; Llama 3's DPO): the chosen likelihood rises, not
    # only the margin. 0: the plain loss.
    nll_weight: float = Field(0.0, ge=0, le=100)
    lr: float | None = Field(None, gt=0)  # None: train.lr
    epochs: int | None = Field(None, ge=1)  # None: train.epochs
    max_steps: int | None = Field(None, ge=1)  # None: train.max_steps


class ImplicitConfig(Strict):
    """Implicit fusion (`method: implicit`): what the sources sample, and how."""

    prompts: list[PromptCorpus] = Field(min_length=1)
    heldout: list[PromptCorpus] = []  # held-out prompts for the evaluation
    engine: Literal["vllm", "hf"] = "vllm"
    samples: int = Field(5, ge=1, le=64)  # responses per prompt and source (FuseChat-3.0: 5; 8 for code)
    sampling: SamplingSpec = SamplingSpec()  # each source's default; `sources[i].sampling` overrides
    seed: int = 0
    shard_rows: int = Field(256, ge=1)  # prompts per shard: the unit of work and of resuming
    batch_size: int = Field(32, ge=1)  # prompts per engine call
    concurrency: int = Field(1, ge=1)  # engine actors per source
    num_cpus_per_actor: float = Field(1, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0)
    max_concurrent_models: int | None = Field(None, ge=1)  # sources sampled side by side; None: all
    # scores open prompts' responses; None: only verifiable corpora (reward = 1 if correct, else 0)
    reward: RewardModelConfig | None = None
    sandbox: SandboxConfig = SandboxConfig()
    pairs: PairsConfig = PairsConfig()
    dpo: PreferenceConfig = PreferenceConfig()
    # sources that also get an arm of their own: SFT then DPO on that source's samples only (the
    # baseline the fused arm is compared against in `eval`); each costs one more SFT and DPO run
    single_source_arms: list[Name] = []

    @model_validator(mode="after")
    def _open_prompts_need_a_reward_model(self) -> ImplicitConfig:
        open_ = [i for i, c in enumerate(self.prompts) if c.verify == "none"]
        if open_ and self.reward is None:
            raise ValueError(f"implicit.reward: prompts {', '.join(f'implicit.prompts.{i}' for i in open_)} "
                             "are open (verify: none): they need a reward model")
        return self


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

    def pairs(self) -> list[tuple[str, str]]:
        """(pivot, source) per fused dataset: one per source in pairwise mode, one in total otherwise."""
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
