"""The `pairs` stage (implicit fusion): `rewards/` → `pairs/sft/` (the best response per SFT
prompt) and `pairs/dpo/` (best/worst pairs of one source per DPO prompt).

The rules (the seeded SFT:DPO prompt split, correctness first for verifiable prompts, the
reward-gap range for open ones, one pair per prompt or one per source) are in
`pairs/rules.py`, set by `implicit.pairs`. A prompt's samples all live in one reward shard
(shard k holds prompt shard k of every source), so each shard is paired on its own: shard k of
`pairs/sft/` and `pairs/dpo/` comes from shard k of `rewards/`, written atomically; a rerun
redoes only missing shards. Rows carry the prompt's chat (`messages`, JSON) for training.
The manifest holds the counts: prompts, SFT rows, DPO pairs and drop reasons, in total, per
source and per domain.

Each single-source arm (`implicit.single_source_arms`, `arms.py`) gets the same below
`pairs/only-<source>/` from that source's samples alone (same split, same rules); its counts
are in the manifest's `extra.arms`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from fusion_ray import io
from fusion_ray.arms import FUSED_ARM, arm_source, training_arms
from fusion_ray.config import FusionConfig
from fusion_ray.contract import StageResult
from fusion_ray.schema import PROMPTS_DIR

SFT = pa.schema([("prompt_id", pa.string()), ("domain", pa.string()), ("source", pa.string()),
                 ("sample_index", pa.int32()), ("messages", pa.string()), ("response", pa.string()),
                 ("reward", pa.float64())])
DPO = pa.schema([("prompt_id", pa.string()), ("domain", pa.string()), ("verifiable", pa.bool_()),
                 ("source", pa.string()), ("messages", pa.string()), ("chosen", pa.string()),
                 ("rejected", pa.string()), ("chosen_reward", pa.float64()), ("rejected_reward", pa.float64()),
                 ("chosen_index", pa.int32()), ("rejected_index", pa.int32())])


def add_counts(total: dict, more: dict) -> dict:
    """Sum two nested count dicts (ints at the leaves) into `total`."""
    for key, value in more.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def pair_shard(rewards: pa.Table, prompts: pa.Table, cfg: FusionConfig,
               source: str | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """(SFT rows, DPO pairs, counts) of one reward shard and its prompt shard (of one source's
    samples only, when `source` is given)."""
    from fusion_ray.pairs import rules as pairs

    p = cfg.implicit.pairs
    messages = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("messages").to_pylist(), strict=True))
    rows = rewards.select(list(pairs.COLUMNS)).to_pylist()
    if source is not None:
        rows = [r for r in rows if r["source"] == source]
    split = pairs.split_prompts(messages, p.dpo_fraction, p.seed)
    gaps = {"min_gap": p.min_gap, "max_gap": p.max_gap, "per_prompt": p.per_prompt}
    sft = [{**r, "messages": messages[r["prompt_id"]]} for r in pairs.build_sft(rows, split)]
    dpo = [{**r, "messages": messages[r["prompt_id"]]} for r in pairs.build_dpo(rows, split, **gaps)]
    counted = pairs.counts(rows, split, **gaps) if rows else {}
    return pa.Table.from_pylist(sft, schema=SFT), pa.Table.from_pylist(dpo, schema=DPO), counted


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    """Pair every reward shard; SFT rows and DPO pairs side by side below `pairs/`."""
    if cfg.implicit is None:
        raise ValueError("the pairs stage needs the `implicit` section (method: implicit)")
    rewards_dir = cfg.stage_dir("reward")
    rewards = io.finished(rewards_dir, "reward")
    prompts_dir = f"{cfg.stage_dir('sample')}/{PROMPTS_DIR}"
    arms = training_arms(cfg)
    fp = io.fingerprint("pairs", cfg.implicit.pairs.model_dump(mode="json"), rewards["fingerprint"],
                        *([arms] if len(arms) > 1 else []))
    started = time.monotonic()
    out_dir = cfg.stage_dir("pairs")
    out = io.begin(out_dir, fp, force)
    if out is None:
        return StageResult.skipped(out_dir)
    names = [Path(f).name for f in io.list_files(rewards_dir)]
    prefix = {arm: "" if arm == FUSED_ARM else f"{arm}/" for arm in arms}
    for name in names:
        todo = [arm for arm in arms if not all(out.has(f"{prefix[arm]}{part}") for part in
                                               (f"sft/{name}", f"dpo/{name}", f"counts/{name}.json"))]
        if not todo:
            continue
        rewards_shard = io.read_table(f"{rewards_dir}/{name}")
        prompts_shard = io.read_table(f"{prompts_dir}/{name}", columns=["prompt_id", "messages"])
        for arm in todo:
            sft, dpo, counted = pair_shard(rewards_shard, prompts_shard, cfg, arm_source(arm))
            out.write_table(f"{prefix[arm]}sft/{name}", sft)
            out.write_table(f"{prefix[arm]}dpo/{name}", dpo)
            io.write_json_atomic(out.path(f"{prefix[arm]}counts/{name}.json"), counted)  # last: the shard is done
    import json

    per_arm: dict = {}
    for arm in arms:
        per_arm[arm] = {}
        for name in names:
            add_counts(per_arm[arm], json.loads(io.read_text(out.path(f"{prefix[arm]}counts/{name}.json"))))
    counted = per_arm.pop(FUSED_ARM)
    total = counted.get("total", {})
    rows = {"in": rewards["rows"]["out"], "sft": total.get("sft_rows", 0), "dpo": total.get("dpo_pairs", 0)}
    out.commit(io.Manifest(stage="pairs", fingerprint=fp, config_hash=cfg.config_hash(), rows=rows,
                           inputs={"rewards": rewards["fingerprint"]}, wall_time_s=time.monotonic() - started,
                           extra={"counts": counted, "arms": per_arm}), config=cfg.to_dict())
    for arm, c in per_arm.items():
        log(f"[pairs] {arm}: {c.get('total', {}).get('sft_rows', 0)} SFT row(s), "
            f"{c.get('total', {}).get('dpo_pairs', 0)} DPO pair(s)")
    drops = {k: v for k, v in total.get("drops", {}).items() if v}
    log(f"[pairs] {total.get('prompts', 0)} prompt(s): {rows['sft']} SFT row(s), {rows['dpo']} DPO pair(s)"
        + (f"; dropped {', '.join(f'{k} {v}' for k, v in drops.items())}" if drops else ""))
    return StageResult("done", [out.final], {"rows": rows, "counts": counted})
