"""What each stage asks Ray for, and where such asks can be placed.

`resource_asks(cfg)` is the one statement of each stage's Ray resource asks (bundles of CPU,
GPU and `accelerator_type:X`), shared by `fusion-ray plan` and by the live preflight of
`pipeline.run_stages`. A vLLM engine holds tensor × pipeline parallel GPUs, so a collect engine
actor or a serve replica asks TP × PP GPUs (when it asks GPUs at all).

Node types come from a Ray cluster launcher YAML (`node_types`): `resources` where given, else
the instance type's numbers from `INSTANCE_TYPES` (cluster.yaml states no GPUs for an instance
type). `unplaceable(asks, nodes)` is pure: which asks no node could ever host.

This module imports neither torch, ray nor transformers (`live_nodes` imports ray when called).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from fusion_ray.config import FusionConfig
from fusion_ray.yamlfile import read_yaml_file

GB = 10**9
MERGE_ACTOR_CPUS = 0.5  # the pipeline's merge stage: logical CPUs per MergeActor (streaming I/O, numpy)


@dataclass(frozen=True)
class Instance:
    """A cloud instance type: vCPUs, GPUs, GPU model (Ray's accelerator type) and memory per GPU (GB)."""

    cpus: int
    gpus: int = 0
    gpu_type: str | None = None
    gpu_gb: float = 0.0


def _family(cpus_by_size: dict[str, tuple[int, int]], prefix: str, gpu: str, gb: float) -> dict[str, Instance]:
    return {f"{prefix}.{size}": Instance(c, g, gpu, gb) for size, (c, g) in cpus_by_size.items()}


_G_SIZES = {"xlarge": (4, 1), "2xlarge": (8, 1), "4xlarge": (16, 1), "8xlarge": (32, 1), "16xlarge": (64, 1),
            "12xlarge": (48, 4), "24xlarge": (96, 4), "48xlarge": (192, 8)}
# Vendor-published numbers (AWS EC2 accelerated-computing and GCP A2/A3 machine-type pages);
# GPU memory is the nominal GB of the model (A100 40GB, 80GB, H100 80GB, H200 141GB, …).
INSTANCE_TYPES: dict[str, Instance] = {
    "p4d.24xlarge": Instance(96, 8, "A100", 40),
    "p4de.24xlarge": Instance(96, 8, "A100", 80),
    "p5.48xlarge": Instance(192, 8, "H100", 80),
    "p5e.48xlarge": Instance(192, 8, "H200", 141),
    "p5en.48xlarge": Instance(192, 8, "H200", 141),
    "p3.2xlarge": Instance(8, 1, "V100", 16),
    "p3.8xlarge": Instance(32, 4, "V100", 16),
    "p3.16xlarge": Instance(64, 8, "V100", 16),
    "p3dn.24xlarge": Instance(96, 8, "V100", 32),
    **_family(_G_SIZES, "g5", "A10G", 24),
    **_family(_G_SIZES, "g6", "L4", 24),
    **_family({**{k: v for k, v in _G_SIZES.items() if k not in ("24xlarge", "48xlarge")}, "metal": (96, 8)},
              "g4dn", "T4", 16),
    "a2-highgpu-1g": Instance(12, 1, "A100", 40),
    "a2-highgpu-2g": Instance(24, 2, "A100", 40),
    "a2-highgpu-4g": Instance(48, 4, "A100", 40),
    "a2-highgpu-8g": Instance(96, 8, "A100", 40),
    "a2-megagpu-16g": Instance(96, 16, "A100", 40),
    "a2-ultragpu-1g": Instance(12, 1, "A100", 80),
    "a2-ultragpu-8g": Instance(96, 8, "A100", 80),
    "a3-highgpu-8g": Instance(208, 8, "H100", 80),
}
# AWS CPU-only sizes: vCPUs per size suffix (m6i.2xlarge: 8).
AWS_VCPUS = {"large": 2, "xlarge": 4, "metal": 96}


def instance(name: str | None) -> Instance | None:
    """The table's entry; for other AWS names, CPUs from the size (`m6i.2xlarge` → 8) and 0 GPUs."""
    if not name:
        return None
    if name in INSTANCE_TYPES:
        return INSTANCE_TYPES[name]
    size = name.rsplit(".", 1)[-1]
    if "." in name and not name.startswith(("p", "g", "inf", "trn", "dl")):
        if size in AWS_VCPUS:
            return Instance(AWS_VCPUS[size])
        if size.endswith("xlarge") and size[:-6].isdigit():
            return Instance(4 * int(size[:-6]))
    return None


@dataclass(frozen=True)
class Ask:
    """`count` units (actors, workers, replicas, tasks) of one bundle, all running at once.

    `upto` is the most that may run (autoscaling replicas); `model` the model a unit holds,
    `tp` × `pp` its vLLM tensor × pipeline parallel sizes.
    """

    stage: str
    what: str
    count: int
    cpus: float
    gpus: float = 0.0
    accelerator_type: str | None = None
    model: str | None = None
    tp: int = 1
    pp: int = 1
    upto: int | None = None

    def bundle(self) -> dict[str, float]:
        """The Ray resource bundle of one unit (the accelerator type as Ray's 0.001 marker)."""
        out = {"CPU": self.cpus}
        if self.gpus:
            out["GPU"] = self.gpus
        if self.accelerator_type:
            out[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return out


def engine_gpus(asked: float, tp: int, pp: int) -> float:
    """GPUs of one vLLM engine, as `placement.engine_placement` places it: none when none are
    asked, the ask for a one-GPU engine, TP × PP otherwise."""
    from fusion_ray.placement import engine_placement

    return float(engine_placement(tensor_parallel=tp, pipeline_parallel=pp, gpus=asked, cpus=0).total_gpus)


def resource_asks(cfg: FusionConfig) -> dict[str, list[Ask]]:
    """Each stage's asks, as the stages make them (prepare runs in the driver: none)."""
    c, t, s = cfg.collect, cfg.train, cfg.serve
    collect = [Ask("collect", f"engine actor ({m.name})", c.concurrency, c.num_cpus_per_actor,
                   engine_gpus(c.num_gpus_per_actor, m.tensor_parallel_size, m.pipeline_parallel_size)
                   if c.engine == "vllm" else c.num_gpus_per_actor,
                   c.accelerator_type, m.name, m.tensor_parallel_size, m.pipeline_parallel_size)
               for m in cfg.models()]
    tp = int(s.engine_options.get("tensor_parallel_size", 1) or 1)
    pp = int(s.engine_options.get("pipeline_parallel_size", 1) or 1)
    serve_gpus = engine_gpus(s.num_gpus, tp, pp) if s.engine == "vllm" else s.num_gpus
    arms = len(cfg.sources) + 1 + len(cfg.source_pairs()) + int(t.clm_only_arm) + 1  # sources, pivot, targets, merged
    asks = {
        "prepare": [],
        "collect": collect,
        "align": [Ask("align", "aligner actor", 1, cfg.align.num_cpus, upto=cfg.align.workers)],
        "fuse": [Ask("fuse", "fuse task", 1, cfg.fuse.num_cpus)],
        "train": [Ask("train", "training rank", t.num_workers, t.cpus_per_worker, 1.0 if t.use_gpu else 0.0,
                      t.accelerator_type, cfg.pivot.name)],
        # one task and its actors, all on the task's node (they share its local disk)
        "merge": [Ask("merge", f"merge task + {cfg.merge.num_actors} actor(s), one node", 1,
                      MERGE_ACTOR_CPUS * (cfg.merge.num_actors + 1))],
        "eval": [Ask("eval", "arm-scoring task", 1, cfg.eval.num_cpus, upto=arms)],
        "serve": [Ask("serve", "replica", max(1, s.min_replicas), s.num_cpus, serve_gpus, s.accelerator_type,
                      cfg.pivot.name, tp, pp, upto=s.max_replicas)],
        **(implicit_asks(cfg) if cfg.implicit else {}),
    }
    asks["eval"] += chat_asks(cfg)
    return asks


def chat_asks(cfg: FusionConfig) -> list[Ask]:
    """eval.chat's answering engine actors (per arm, the arms side by side; sized as the pivot; none
    without a question file: the implicit eval's own answers are judged), a reward-model judge's
    scoring task, and eval.lm_eval's tasks (one per model-dir arm)."""
    out = []
    chat, lm, p = cfg.eval.chat, cfg.eval.lm_eval, cfg.pivot
    if chat is not None and chat.judge is not None and chat.judge.reward_model is not None:
        rm = chat.judge.reward_model
        out.append(Ask("eval", "reward-model judge task", 1, rm.num_cpus_per_actor, rm.num_gpus_per_actor))
    if chat is not None and chat.questions is not None:
        vllm = chat.engine == "vllm"
        out.append(Ask("eval", "chat answer engine actor (per arm)", chat.concurrency, chat.num_cpus,
                       engine_gpus(chat.num_gpus, p.tensor_parallel_size, p.pipeline_parallel_size)
                       if vllm else chat.num_gpus, None, p.name, p.tensor_parallel_size if vllm else 1,
                       p.pipeline_parallel_size if vllm else 1))
    if lm is not None and lm.arms:
        out.append(Ask("eval", "lm-eval task (per arm)", 1, lm.num_cpus, lm.num_gpus, None, p.name))
    return out


def implicit_asks(cfg: FusionConfig) -> dict[str, list[Ask]]:
    """The implicit method's stages: sampling engines per source, the reward scorers, SFT and DPO
    training ranks (DPO also its reference-pass engine actors); `pairs` runs in the driver."""
    imp, t = cfg.implicit, cfg.train
    vllm = imp.engine == "vllm"
    sample = [Ask("sample", f"engine actor ({m.name})", imp.concurrency, imp.num_cpus_per_actor,
                  engine_gpus(imp.num_gpus_per_actor, m.tensor_parallel_size, m.pipeline_parallel_size)
                  if vllm else imp.num_gpus_per_actor, None, m.name,
                  m.tensor_parallel_size if vllm else 1, m.pipeline_parallel_size if vllm else 1)
              for m in cfg.sources]
    rm = imp.reward
    reward = [Ask("reward", "scorer actor (verifiers" + (" + reward model)" if rm else ")"),
                  rm.concurrency if rm else 1, rm.num_cpus_per_actor if rm else 1,
                  rm.num_gpus_per_actor if rm else 0.0)]
    ranks = lambda stage: Ask(stage, "training rank", t.num_workers, t.cpus_per_worker,  # noqa: E731
                              1.0 if t.use_gpu else 0.0, t.accelerator_type, cfg.pivot.name)
    reference = Ask("dpo", "reference-pass engine actor", imp.concurrency, imp.num_cpus_per_actor,
                    imp.num_gpus_per_actor)
    # eval: the arms (pivot, SFT, SFT+DPO, single-source arms) answer the held-out prompts on the sampling
    # engines, then the scorers
    answers = Ask("eval", "engine actor (per arm)", imp.concurrency, imp.num_cpus_per_actor,
                  engine_gpus(imp.num_gpus_per_actor, cfg.pivot.tensor_parallel_size, cfg.pivot.pipeline_parallel_size)
                  if vllm else imp.num_gpus_per_actor, None, cfg.pivot.name,
                  cfg.pivot.tensor_parallel_size if vllm else 1, cfg.pivot.pipeline_parallel_size if vllm else 1,
                  upto=(3 + len(imp.single_source_arms)) * imp.concurrency)
    return {"sample": sample, "reward": reward, "pairs": [], "sft": [ranks("sft")], "dpo": [reference, ranks("dpo")],
            "eval": [answers, *[dataclasses.replace(a, stage="eval") for a in reward]]}


# --- node types of a cluster launcher YAML -----------------------------------------------------


@dataclass
class NodeType:
    """One node type: its Ray resources, GPU memory (bytes; 0 when unknown) and most nodes."""

    name: str
    resources: dict[str, float]
    max_nodes: int
    instance: str | None = None
    gpu_type: str | None = None
    gpu_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0.0)


def node_type(name: str, spec: dict, max_nodes: int) -> NodeType:
    """Resources from `resources` (what Ray uses), filled in from the instance table."""
    config = spec.get("node_config") or {}
    name_of_instance = config.get("InstanceType") or config.get("machineType")
    known = instance(name_of_instance)
    given = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
    res = dict(given)
    notes = []
    if known:
        res.setdefault("CPU", float(known.cpus))
        res.setdefault("GPU", float(known.gpus))
        if known.gpu_type and res.get("GPU"):
            res.setdefault(f"accelerator_type:{known.gpu_type}", 1.0)
    elif "GPU" not in given:
        res.setdefault("GPU", 0.0)
        notes.append(f"instance type {name_of_instance or '(none)'} is not in plan's table: GPUs assumed 0 "
                     f"(state resources: {{GPU: n}} in the cluster YAML)")
    gpu_type = known.gpu_type if known else None
    gpu_bytes = int(known.gpu_gb * GB) if known and known.gpus else 0
    if res.get("GPU") and not gpu_bytes:
        notes.append(f"GPU memory of {name_of_instance or name} unknown: memory not checked")
    return NodeType(name, res, max_nodes, name_of_instance, gpu_type, gpu_bytes, notes)


def node_types(cluster: dict) -> list[NodeType]:
    """The node types of a cluster launcher config (the head counts once, workers up to their max)."""
    types = cluster.get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise ValueError("cluster config: no available_node_types")
    head = cluster.get("head_node_type")
    out = []
    for name, spec in types.items():
        default = 0 if name == head else cluster.get("max_workers", 0)  # the head type: only the head
        most = int((spec or {}).get("max_workers", default) or 0)
        out.append(node_type(name, spec or {}, most + (1 if name == head else 0)))
    return out


def load_cluster(path: str | os.PathLike[str]) -> tuple[str, list[NodeType]]:
    """(cluster name, node types) of a cluster launcher YAML.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not YAML, or no node types.
    """
    path = Path(path)
    data = read_yaml_file(path, "cluster config") or {}  # ConfigError (a ValueError) when unreadable
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return str(data.get("cluster_name", path.stem)), node_types(data)


# --- placement ---------------------------------------------------------------------------------


def per_node(bundle: dict[str, float], resources: dict[str, float]) -> int:
    """How many such bundles one node with `resources` holds at once (0: none)."""
    fits = []
    for key, amount in bundle.items():
        if amount <= 0:
            continue
        have = resources.get(key, 0.0)
        if key.startswith("accelerator_type:"):
            if have <= 0:
                return 0
            continue
        fits.append(math.floor(have / amount + 1e-9))
    return min(fits) if fits else 1_000_000


def describe(bundle: dict[str, float]) -> str:
    """`{CPU: 4, GPU: 2, accelerator_type: A100}` in plain words."""
    parts = [f"{k} {v:g}" for k, v in bundle.items() if not k.startswith("accelerator_type:")]
    parts += [f"accelerator_type {k.split(':', 1)[1]}" for k in bundle if k.startswith("accelerator_type:")]
    return ", ".join(parts)


def unplaceable(asks: list[Ask], nodes: list[dict[str, float]]) -> list[str]:
    """One line per ask that no node (resource dict, as `ray.nodes()` reports) can ever host."""
    lines = []
    seen = set()
    for ask in asks:
        bundle = ask.bundle()
        key = (ask.stage, tuple(sorted(bundle.items())))
        if key in seen or any(per_node(bundle, n) for n in nodes):
            continue
        seen.add(key)
        most_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        most_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        types = sorted({k.split(":", 1)[1] for n in nodes for k in n if k.startswith("accelerator_type:")})
        lines.append(f"{ask.stage}: each {ask.what} asks {describe(bundle)}, but no node of the Ray cluster "
                     f"has that ({len(nodes)} node(s); at most CPU {most_cpus:g}, GPU {most_gpus:g} on one; "
                     f"accelerator types: {', '.join(types) or 'none'})")
    return lines


def bootstrap_node_types() -> list[dict[str, float]]:
    """Resources of the node types the autoscaler can add: from the launcher's bootstrap config on
    the head (`$FUSION_RAY_AUTOSCALING_CONFIG`, default `~/ray_bootstrap_config.yaml`), if present."""
    path = Path(os.environ.get("FUSION_RAY_AUTOSCALING_CONFIG", "~/ray_bootstrap_config.yaml")).expanduser()
    if not path.is_file():
        return []
    try:
        _, types = load_cluster(path)
    except (OSError, ValueError):
        return []
    return [t.resources for t in types if t.max_nodes > 0]


def live_nodes() -> list[dict[str, float]]:
    """Resources of the connected Ray's alive nodes plus the node types its autoscaler can add."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")] + bootstrap_node_types()
