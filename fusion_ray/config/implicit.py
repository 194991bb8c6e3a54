"""The `implicit` section of implicit fusion (FuseChat-3.0, `method: implicit`): the prompt corpora,
the reward model, the code sandbox, how samples become SFT rows and DPO pairs, and the DPO loss."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fusion_ray.config.models import Name, SamplingSpec, Strict, check_location, checks_files


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


class DPOConfig(Strict):
    """`implicit.dpo`: the `dpo` stage's preference loss (the trainer's `objective.Preference`,
    computed by `trainer/preference.py`) and the training settings it changes.

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
    dpo: DPOConfig = DPOConfig()
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
