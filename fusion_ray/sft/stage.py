"""The `sft` stage (implicit fusion): the target (the pivot) fine-tuned on `pairs/sft/`, the best
response per SFT prompt, with the loss on the response tokens only.

The rows are first encoded with the target's tokenizer and chat template
(`chat_template.py`) into `sft_data/part-*.parquet`, one shard per pairs shard, in the
explicit pipeline's training-row schema (FUSED, with an empty teacher); then the `train` stage's
trainer (`train.stage.fit_target`: Ray Train, `train.strategy` DeepSpeed ZeRO or DDP,
checkpoints, restarts, the same deterministic row order) trains arm `sft` with λ = 1, i.e. plain
cross-entropy on the response tokens, into `sft/` (an HF model dir with the target's tokenizer).
All `train.*` settings apply (lr, epochs or max_steps, batch sizes, bf16, gradient checkpointing).

Single-source arms (`implicit.single_source_arms`) are trained the same way from
`pairs/only-<source>/sft/` into `sft-only-<source>/`, beside the fused arm,
`train.max_concurrent_arms` at a time.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion_ray import io, locations
from fusion_ray import tokenizer as tokenizers
from fusion_ray.arms import FUSED_ARM, arm_dir, arm_name, run_arms
from fusion_ray.arrays import ragged
from fusion_ray.config import FusionConfig
from fusion_ray.contract import StageResult
from fusion_ray.schema import FUSED


def data_dir(cfg: FusionConfig, arm: str = FUSED_ARM) -> str:
    """Where an arm's encoded SFT rows live: beside its model dir, not in it (that is swapped in whole)."""
    return arm_dir(cfg, "sft", arm) + "_data"


def training_rows(rows: list[dict], tokenizer, max_length: int) -> tuple[pa.Table, dict[str, int]]:
    """Encoded rows of the FUSED schema (an empty teacher: one id with log-prob 0 per scored
    position, unused at λ = 1) and the count of rows dropped, by reason."""
    from fusion_ray.chat_template import RowRejected, encode_response

    out, dropped = {k: [] for k in FUSED.names}, {"refused_by_template": 0, "no_response_within_max_length": 0}
    for r in rows:
        try:
            enc = encode_response(tokenizer, json.loads(r["messages"]), r["response"], max_length)
        except RowRejected:
            dropped["refused_by_template"] += 1
            continue
        if enc is None:
            dropped["no_response_within_max_length"] += 1
            continue
        ids, mask = enc
        n = int(mask.sum())
        for key, value in (("sample_id", f"{r['prompt_id']}"), ("domain", r["domain"]), ("input_ids", ids),
                           ("loss_mask", mask), ("topk_ids", np.zeros((n, 1), np.int32)),
                           ("topk_logprobs", np.zeros((n, 1), np.float16)), ("transferred", np.zeros(n, bool)),
                           ("weights", np.zeros(0, np.float32))):
            out[key].append(value)
    table = pa.Table.from_pydict({
        "sample_id": pa.array(out["sample_id"], pa.string()), "domain": pa.array(out["domain"], pa.string()),
        **{k: ragged(out[k], t) for k, t in (("input_ids", pa.int32()), ("loss_mask", pa.bool_()),
                                             ("topk_ids", pa.int32()), ("topk_logprobs", pa.float16()),
                                             ("transferred", pa.bool_()), ("weights", pa.float32()))}},
        schema=FUSED)
    return table, dropped


def encode(cfg: FusionConfig, force: bool, log=print, arm: str = FUSED_ARM) -> dict:
    """Encode an arm's `pairs/…/sft/` into its `sft…_data/` (once per pairs output, tokenizer and max_length)."""
    pairs_dir = cfg.stage_dir("pairs")
    pairs = io.finished(pairs_dir, "pairs")
    fp = io.fingerprint("sft_data", pairs["fingerprint"], cfg.data.max_length,
                        locations.fingerprint(cfg.pivot.tokenizer or cfg.pivot.path, revision=cfg.pivot.revision),
                        *([arm] if arm != FUSED_ARM else []))
    out = io.begin(data_dir(cfg, arm), fp, force)
    if out is None:
        return io.read_manifest(data_dir(cfg, arm))
    tokenizer = tokenizers.for_model(cfg.pivot)
    dropped: dict[str, int] = {}
    n_in = n_out = 0
    rows_dir = arm_dir(cfg, "pairs", arm)
    for f in io.list_files(f"{rows_dir}/sft"):
        name = Path(f).name
        rows = io.read_table(f).to_pylist()
        table, why = training_rows(rows, tokenizer, cfg.data.max_length)
        out.write_table(name, table)
        n_in, n_out = n_in + len(rows), n_out + table.num_rows
        dropped = {k: dropped.get(k, 0) + v for k, v in why.items()}
    if n_out == 0:
        raise ValueError(f"sft: no training row: {n_in} SFT row(s) in {rows_dir}/sft, dropped {dropped}")
    manifest = out.commit(io.Manifest(stage="sft", fingerprint=fp, config_hash=cfg.config_hash(),
                                      rows={"in": n_in, "out": n_out}, inputs={"pairs": pairs["fingerprint"]},
                                      extra={"dropped": dropped}), config=cfg.to_dict())
    log(f"[sft] {arm_name('sft', arm)}: {n_out} training row(s) of {n_in}"
        + (f"; dropped {dropped}" if any(dropped.values()) else ""))
    return dataclasses.asdict(manifest)


def train_arm(cfg: FusionConfig, arm: str, force: bool = False, log=print) -> StageResult:
    """Encode one arm's SFT rows, then train the target on them (λ = 1)."""
    from fusion_ray.trainer.fit import fit_target
    from fusion_ray.trainer.objective import Distill  # λ = 1: CLM on the response tokens

    started = time.monotonic()
    manifest = encode(cfg, force, log, arm)
    result = fit_target(cfg, objective=Distill(lambda_clm=1.0), name=arm_name("sft", arm), arm="sft",
                        data_dir=data_dir(cfg, arm), manifest=manifest,
                        out_dir=arm_dir(cfg, "sft", arm), stage="sft", input_name="sft_data", force=force, log=log)
    result.figures["wall_s"] = round(time.monotonic() - started, 1)
    return result


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    """Train every arm (`arms.py`): the fused one, then each single-source arm."""
    from fusion_ray.ray_env import init_ray

    if cfg.implicit is None:
        raise ValueError("the sft stage needs the `implicit` section (method: implicit)")
    init_ray(cfg.ray)
    return run_arms(cfg, "sft", train_arm, force, log)

