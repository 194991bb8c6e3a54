"""What a training run optimises, handed to the trainer by the stage that runs it.

The trainer (`fit.fit_target`, `loop.py`) reads its loss settings from these and nothing else: it
does not know which method or stage it trains for. Each records itself in the target's manifest
(`record`), so a manifest says what that arm's loss really was.

- `Distill(lambda_clm)`: λ·CLM + (1−λ)·fusion on rows of the FUSED schema (the `train` stage's
  arms; λ = 1 is CLM alone: the `clm_only` arm, and implicit fusion's `sft` on its responses).
- `Preference(loss, beta, ...)`: a preference loss on chosen/rejected rows with precomputed
  reference log-probs (implicit fusion's `dpo`; the kinds are `preference.KINDS`).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Distill:
    lambda_clm: float

    kind = "distill"
    packs = True  # rows of one sequence each: `train.packing` may pack them

    def record(self) -> dict[str, Any]:
        return {"objective": "clm" if self.lambda_clm == 1.0 else "fusion", "lambda_clm": self.lambda_clm}


@dataclasses.dataclass(frozen=True)
class Preference:
    loss: str
    beta: float
    label_smoothing: float = 0.0
    gamma_beta_ratio: float = 0.0
    nll_weight: float = 0.0

    kind = "preference"
    packs = False  # chosen/rejected pairs: never packed

    def record(self) -> dict[str, Any]:
        return {"objective": "preference", **dataclasses.asdict(self)}


Objective = Distill | Preference
KINDS = {c.kind: c for c in (Distill, Preference)}


def to_wire(objective: Objective) -> dict[str, Any]:
    return {"kind": objective.kind, **dataclasses.asdict(objective)}


def from_wire(data: dict[str, Any]) -> Objective:
    fields = dict(data)
    return KINDS[fields.pop("kind")](**fields)
