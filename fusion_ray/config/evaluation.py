"""The `eval` section: held-out scoring, chat evaluation with an LLM judge, lm-evaluation-harness
tasks, and the OpenAI-compatible endpoints they may call."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fusion_ray.config.models import Name, SamplingSpec, Strict, check_location, checks_files


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
