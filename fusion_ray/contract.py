"""The contract every stage keeps, and what a stage returns.

Each stage (`config.ALL_STAGES`: the explicit method's `STAGES` and the implicit method's
`IMPLICIT_STAGES`) lives in its own package, `fusion_ray/<package>/stage.py` (the package is the
stage's name, `evaluate` for `eval`), whose `run(cfg, force=False, log=print) -> StageResult`
skips itself when its output's manifest matches the config and inputs (`io.begin`). A stage
package imports no other stage package: what two stages share lives outside every stage package
(`engines/`, `checkpoint/`, `trainer/`, `chat_template`, `corpus`, ...). Only the pipeline
(`pipeline.py`) imports stages, and it alone runs them in order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fusion_ray.config import ALL_STAGES

STAGE_PACKAGES = {"eval": "evaluate"}  # a stage whose package is not named after it


@dataclasses.dataclass
class StageResult:
    """What a stage's `run` returns.

    Attributes:
        status: "done", "skipped" (its manifest matched: nothing ran) or "deployed" (serve).
        dirs: the output directories (or URIs) the stage wrote or found done.
        figures: what it reports: row counts, metrics, routing, bpb, the report's path, the
            served URL; a part run side by side also its wall-clock `started_at` / `finished_at`.
        parts: for a stage of independent parts (collect: per model, align: per source, fuse:
            per pair, train: per target), each part's own result.
    """

    status: str = "done"
    dirs: list[str] = dataclasses.field(default_factory=list)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    parts: dict[str, StageResult] = dataclasses.field(default_factory=dict)

    @classmethod
    def skipped(cls, directory: str, **figures: Any) -> StageResult:
        """A stage (or part) whose output at `directory` was already done."""
        return cls("skipped", [directory], figures)

    @classmethod
    def of_parts(cls, parts: dict[str, StageResult]) -> StageResult:
        """A stage made of parts: `skipped` when every part was, else `done`."""
        status = "skipped" if parts and all(p.status == "skipped" for p in parts.values()) else "done"
        return cls(status, [d for p in parts.values() for d in p.dirs], parts=parts)

    @classmethod
    def of_outcomes(cls, outcomes: dict) -> StageResult:
        """`of_parts` of parts run side by side (`parallel.run_parts`), each with its wall-clock times."""
        return cls.of_parts({name: dataclasses.replace(o.result, figures={
            **o.result.figures, "started_at": o.started_at, "finished_at": o.finished_at})
            for name, o in outcomes.items()})

    @property
    def dir(self) -> str:
        """The output directory of a stage (or part) that has one."""
        if len(self.dirs) != 1:
            raise ValueError(f"a result with {len(self.dirs)} output dirs has no single `dir`: {self.dirs}")
        return self.dirs[0]


def stage_module(stage: str) -> str:
    """The module that runs `stage`: `fusion_ray.<package>.stage`."""
    if stage not in ALL_STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(ALL_STAGES)}")
    return f"fusion_ray.{STAGE_PACKAGES.get(stage, stage)}.stage"
