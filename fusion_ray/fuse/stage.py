"""The `fuse` stage on Ray Data: pivot + aligned sources → `fused/<pair>/`, one teacher per position.

Pairwise mode (FuseChat) builds one fused dataset per source from the pivot and
that source; multi mode one from the pivot and every source. Per sequence the
strategy (MinCE / AvgCE) weighs the candidates by their score (`ce` or `bpb`); the
result keeps the pivot's tokens and loss mask and a top-k teacher at each scored
position. Shards are joined by `sample_id`, written atomically, resumable; the
manifest records which candidate won, per domain (the routing statistics).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion_ray import io, schema
from fusion_ray.arrays import ragged, rows_of
from fusion_ray.config import FusionConfig
from fusion_ray.contract import StageResult
from fusion_ray.distributions import score, stored_rows
from fusion_ray.fuse.strategies import STRATEGIES, mix
from fusion_ray.schema import ShardMismatch, read_shard


def pair_sources(pair: str) -> list[str]:
    """The sources of a pair name: "computing" or, in multi mode, "computing+english"."""
    return pair.split("+")


def fuse_shard(cfg: FusionConfig, pair: str, name: str, out_dir: str) -> dict:
    """Fuse one shard and write it atomically."""
    sources = pair_sources(pair)
    prepared = read_shard(f"{cfg.stage_dir('prepare')}/{name}", "prepared").select(["sample_id", "domain"])
    pivot = rows_of(read_shard(f"{cfg.stage_dir('collect', cfg.pivot.name)}/{name}", "logits"))
    aligned = {s: rows_of(read_shard(f"{cfg.stage_dir('align', s)}/{name}", "aligned")) for s in sources}
    domains = prepared.column("domain").to_pylist()
    strategy, metric, k = STRATEGIES[cfg.fuse.strategy], cfg.fuse.metric, cfg.collect.top_k
    rows = []
    for i, p in enumerate(pivot):
        cands = [aligned[s][i] for s in sources]
        for s, c in zip(sources, cands, strict=True):
            if c["sample_id"] != p["sample_id"]:
                raise ShardMismatch(f"sample {c['sample_id']!r} in {cfg.stage_dir('align', s)}/{name} does "
                                    f"not match sample {p['sample_id']!r} of the pivot (same row)")
        mask = np.asarray(p["loss_mask"], dtype=bool)
        scored = stored_rows(mask, cfg.collect.scored_only)[mask]
        ids = [np.asarray(p["topk_ids"])[scored]] + [np.asarray(c["topk_ids"]) for c in cands]
        lps = [np.asarray(p["topk_logprobs"], np.float32)[scored]] + \
              [np.asarray(c["topk_logprobs"], np.float32) for c in cands]
        weights = strategy(candidate_scores(p, cands, metric))
        top_ids, top_lp = mix(ids, lps, weights, k)
        reached = np.zeros(int(mask.sum()), dtype=bool)
        for w, c in zip(weights[1:], cands, strict=True):
            reached |= np.asarray(c["transferred"], dtype=bool) & (w > 0)
        rows.append({"sample_id": p["sample_id"], "domain": domains[i], "input_ids": np.asarray(p["input_ids"]),
                     "loss_mask": mask, "topk_ids": top_ids, "topk_logprobs": top_lp.astype(np.float16),
                     "transferred": reached, "weights": weights.astype(np.float32)})
    io.write_parquet_atomic(f"{out_dir}/{name}", fused_table(rows))
    return {"shard": name, "rows": len(rows)}


def candidate_scores(pivot: dict, sources: list[dict], metric: str) -> np.ndarray:
    """Each candidate's score on one sample, the pivot first (lower is better): `bpb`, bits per
    UTF-8 byte of the scored text, one unit for every tokenizer; `ce`, mean NLL per token of each
    model's own tokenization (FuseLLM's), which favours the finer tokenizer on the same text.

    Args:
        pivot: the pivot's `logits/` row (`nll_sum`, `loss_mask`, `n_bytes`).
        sources: each source's `aligned/` row (`source_ce`, `source_bpb`).
    """
    mask = np.asarray(pivot["loss_mask"], dtype=bool)
    own = score(pivot["nll_sum"], int(mask.sum()), pivot["n_bytes"], metric)
    return np.array([own] + [c["source_ce"] if metric == "ce" else c["source_bpb"] for c in sources], dtype=np.float64)


def fuse_row(row: dict, cfg: dict, pair: str, out_dir: str) -> dict:
    """Ray Data task: fuse the shard a row names; `cfg` as `FusionConfig.to_wire` sent it."""
    return fuse_shard(FusionConfig.from_wire(cfg), pair, row["shard"], out_dir)


def fused_table(rows: list[dict]) -> pa.Table:
    columns = {
        "sample_id": pa.array([r["sample_id"] for r in rows], pa.string()),
        "domain": pa.array([r["domain"] for r in rows], pa.string()),
        **{key: ragged([r[key] for r in rows], typ) for key, typ in (
            ("input_ids", pa.int32()), ("loss_mask", pa.bool_()), ("topk_ids", pa.int32()),
            ("topk_logprobs", pa.float16()), ("transferred", pa.bool_()), ("weights", pa.float32()))},
    }
    return pa.Table.from_pydict(columns, schema=schema.FUSED)


def routing(paths: list[str], candidates: list[str]) -> dict:
    """Winner counts (highest weight) and mean weights per domain, from written shards."""
    wins: dict[str, Counter] = defaultdict(Counter)
    sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(candidates)))
    for path in paths:
        table = io.read_table(path, columns=["domain", "weights"])
        for domain, w in zip(table.column("domain").to_pylist(), table.column("weights").to_pylist(), strict=True):
            wins[domain][candidates[int(np.argmax(w))]] += 1
            sums[domain] += w
    return {d: {"wins": dict(wins[d]), "mean_weight": dict(zip(candidates, np.round(
        sums[d] / max(sum(wins[d].values()), 1), 4).tolist(), strict=True))} for d in wins}


def fuse_pair(cfg: FusionConfig, pair: str, force: bool = False, log=print) -> StageResult:
    import ray

    sources = pair_sources(pair)
    manifests = {s: io.read_manifest(cfg.stage_dir("align", s)) for s in sources}
    manifests[cfg.pivot.name] = io.read_manifest(cfg.stage_dir("collect", cfg.pivot.name))
    missing = [m for m, v in manifests.items() if v is None]
    if missing:
        raise FileNotFoundError(f"fuse {pair}: missing finished inputs for {', '.join(missing)}")
    inputs = {m: v["fingerprint"] for m, v in manifests.items()}
    out_dir = cfg.stage_dir("fuse", pair)
    fp = io.fingerprint("fuse", cfg.to_dict()["fuse"], cfg.collect.top_k, inputs)
    started = time.monotonic()
    out = io.begin(out_dir, fp, force)
    if out is None:
        return StageResult.skipped(out_dir)
    names = [Path(s).name for s in io.list_files(cfg.stage_dir("collect", cfg.pivot.name))]
    todo = [n for n in names if not out.has(n)]
    if todo:
        ray.data.from_items([{"shard": n} for n in todo]).map(
            fuse_row, fn_kwargs={"cfg": cfg.to_wire(), "pair": pair, "out_dir": out.dir},
            num_cpus=cfg.fuse.num_cpus).materialize()
    paths = [out.path(n) for n in names]
    stats = routing(paths, ["pivot"] + sources)
    n_rows = sum(sum(d["wins"].values()) for d in stats.values())
    out.commit(io.Manifest(stage="fuse", fingerprint=fp, config_hash=cfg.config_hash(), inputs=inputs,
                           rows={"in": n_rows, "out": n_rows},
                           extra={"pair": pair, "candidates": ["pivot"] + sources, "strategy": cfg.fuse.strategy,
                                  "metric": cfg.fuse.metric, "routing": stats,
                                  "pivot_vocab": manifests[sources[0]]["extra"].get("pivot_vocab")},
                           wall_time_s=time.monotonic() - started), config=cfg.to_dict())
    from fusion_ray.progress import rate

    log(f"[fuse] {pair}: {rate(n_rows, time.monotonic() - started)}; "
        f"routing {({d: s['wins'] for d, s in stats.items()})}")
    return StageResult("done", [out_dir], {"routing": stats})


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    """Fuse the pivot with each source (pairwise) or with all of them (multi); `parts`: one result per pair."""
    from fusion_ray.ray_env import init_ray

    init_ray(cfg.ray)
    return StageResult.of_parts({pair: fuse_pair(cfg, pair, force, log) for _, pair in cfg.source_pairs()})
