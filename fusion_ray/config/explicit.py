"""The sections of explicit fusion (`method: explicit`): the corpora (`data`), then a section per
stage: `collect`, `align`, `fuse`, `train` (with its `tracking` and `peft`) and `merge`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fusion_ray.config.models import Strict, absolute_path, check_location, checks_files
from fusion_ray.merge.registry import METHODS as MERGE_METHODS  # pure Python, no torch


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
    # bpb: candidates compared per byte of the same text, a unit no tokenizer changes; ce (per token of
    # each model's own tokenization, FuseLLM's) favours the finer tokenizer (docs/design.md#fusion-mince-and-avgce)
    metric: Literal["ce", "bpb"] = "bpb"
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
        """λ of a `train` arm's loss λ·CLM + (1−λ)·fusion: 1 (CLM alone) for the `clm_only` arm."""
        return 1.0 if arm == "clm_only" else self.lambda_clm


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
