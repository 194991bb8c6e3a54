"""The `eval` section: held-out scoring, chat evaluation with an LLM judge, lm-evaluation-harness
tasks, and the OpenAI-compatible endpoints they may call."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fusion_ray.config.implicit import RewardModelConfig
from fusion_ray.config.models import Name, SamplingSpec, Strict, check_location, checks_files


class Endpoint(Strict):
    """Any OpenAI-compatible endpoint (our served model included): base URL (…/v1), model name and
    the name of the env var holding its key (the key itself is never in a config)."""

    url: str = Field(pattern=r"^https?://", max_length=2048)
    model: str = Field(min_length=1, max_length=256)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class JudgeConfig(Strict):
    """The judge of chat evaluation (`eval.chat.judge`): an LLM behind an OpenAI-compatible endpoint
    (`url`, `model`, `api_key_env`), or a local reward model (`reward_model`: a sequence-classification
    model dir, hub id, store URI or demo asset) that prefers the answer it scores higher.

    `single`: MT-Bench-style grading 1–10 of each answer turn (against the question's reference
    answer in `reference_categories`; an LLM judge only); `pairwise`: each arm against each
    `baseline` arm, both orders (inconsistent verdicts count as ties), with a length-controlled win
    rate. Every call's prompt and output is saved under the eval dir, so a rerun re-scores from them
    with no calls (docs/chat_eval.md)."""

    url: str | None = Field(None, pattern=r"^https?://", max_length=2048)
    model: str | None = Field(None, min_length=1, max_length=256)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    reward_model: RewardModelConfig | None = None
    modes: list[Literal["single", "pairwise"]] = Field(["single"], min_length=1)
    # pairwise: the arm(s) every other arm is compared with (a pair of two baselines is judged once)
    baseline: str | list[str] = "pivot"
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

    @model_validator(mode="after")
    def _one_judge(self) -> JudgeConfig:
        if (self.url is None) == (self.reward_model is None):
            raise ValueError("eval.chat.judge: give either `url` and `model` (an LLM judge endpoint) or "
                             "`reward_model` (a local sequence-classification model), not both or neither")
        if self.url is not None and self.model is None:
            raise ValueError("eval.chat.judge.model: an LLM judge endpoint needs the model name it serves")
        if self.reward_model is not None and "single" in self.modes:
            raise ValueError("eval.chat.judge.modes: a reward-model judge compares answers (pairwise); "
                             "grading 1-10 (single) needs an LLM judge")
        if not self.baselines:
            raise ValueError("eval.chat.judge.baseline: name at least one arm")
        if len(set(self.baselines)) < len(self.baselines):
            raise ValueError("eval.chat.judge.baseline: an arm is named twice")
        return self

    @property
    def baselines(self) -> list[str]:
        return [self.baseline] if isinstance(self.baseline, str) else list(self.baseline)

    @property
    def name(self) -> str:
        """What the judge is called in records and reports: the endpoint's model, or the reward model."""
        return self.model if self.reward_model is None else f"reward-model:{self.reward_model.path}"


class ChatEvalConfig(Strict):
    """Chat evaluation (`eval.chat`): every chosen arm answers a question file (MT-Bench's
    question.jsonl reads as is: `question_id`, `category`, `turns`, optional `reference`), turn by
    turn (a later turn sees the arm's own earlier answers), as a Ray Data pass per arm; then the
    optional judge grades the answers."""

    # JSONL; a local path, store URI or demo asset. Implicit method: None judges the answers the eval
    # stage already has to the held-out prompts without a verifier (`implicit.heldout`, verify: none)
    questions: str | None = None
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
    def _exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        return check_location(v, kind="corpus") if v is not None and checks_files(info) else v


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
