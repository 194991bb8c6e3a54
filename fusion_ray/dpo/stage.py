"""The `dpo` stage (implicit fusion): the SFT model trained with a preference loss on `pairs/dpo/`,
against itself frozen as the reference.

1. The reference pass: Ray Data streams the pairs through engine actors (`RefScoreUDF`, the
   `collect` stage's scoring engines: vLLM, or transformers with `implicit.engine: hf`) holding
   the SFT model. Each pair's chosen and rejected responses are encoded with the target's chat
   template (`chat_template.py`) and scored; the reference log-prob of a response is the sum
   of its tokens' log-probs. Rows go to `dpo_data/part-*.parquet` (one shard per pairs shard,
   written atomically once complete, the first copy of each pair kept; a rerun redoes only
   missing shards). No reference model is held in training memory.
2. Training: the `train` stage's trainer (`trainer/fit.py`: Ray Train, DeepSpeed ZeRO or DDP,
   checkpoints, restarts, deterministic row order) starts from the SFT weights and minimises
   `implicit.dpo.loss` (sigmoid DPO, length-normalised DPO, IPO or SimPO; β, label smoothing)
   with `implicit.dpo.lr` / `epochs` / `max_steps` in place of `train`'s where set → `dpo/`.

Single-source arms (`implicit.single_source_arms`) do both steps from their own SFT model and
pairs: `pairs/only-<source>/dpo/` → `dpo-only-<source>_data/` → `dpo-only-<source>/`.
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
from fusion_ray.shards import columns_key, map_shards

PAIR_ROWS = pa.schema([("sample_id", pa.string()), ("domain", pa.string()), ("source", pa.string()),
                       ("chosen_ids", pa.list_(pa.int32())), ("chosen_mask", pa.list_(pa.bool_())),
                       ("rejected_ids", pa.list_(pa.int32())), ("rejected_mask", pa.list_(pa.bool_())),
                       ("ref_chosen", pa.float64()), ("ref_rejected", pa.float64()),
                       ("chosen_len", pa.int32()), ("rejected_len", pa.int32())])


def data_dir(cfg: FusionConfig, arm: str = FUSED_ARM) -> str:
    """Where an arm's encoded, reference-scored pairs live: beside its model dir (swapped in whole)."""
    return arm_dir(cfg, "dpo", arm) + "_data"


class RefScoreUDF:
    """Ray Data callable class: pairs in, encoded pairs with the reference's log-probs out."""

    def __init__(self, cfg: dict, reference: str):
        from fusion_ray.engines import scoring as engines

        self.cfg = FusionConfig.from_wire(cfg)
        self.tokenizer = tokenizers.for_model(self.cfg.pivot)
        path = locations.local_dir(reference)
        dtype = self.cfg.pivot.dtype
        if self.cfg.implicit.engine == "vllm":
            self.engine = engines.VLLMEngine(path, k=1, dtype=dtype, max_model_len=self.cfg.data.max_length + 16,
                                             trust_remote_code=self.cfg.pivot.trust_remote_code)
        else:
            self.engine = engines.HFEngine(path, dtype=dtype, trust_remote_code=self.cfg.pivot.trust_remote_code)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from fusion_ray.chat_template import RowRejected, encode_response

        kept, seqs = [], []
        for r in batch.to_pylist():
            chat = json.loads(r["messages"])
            try:
                chosen = encode_response(self.tokenizer, chat, r["chosen"], self.cfg.data.max_length)
                rejected = encode_response(self.tokenizer, chat, r["rejected"], self.cfg.data.max_length)
            except RowRejected:
                chosen = rejected = None
            kept.append((r, chosen, rejected))
            if chosen is not None and rejected is not None:
                seqs += [chosen[0], rejected[0]]
        scored = iter(self.engine.score(seqs, 1)) if seqs else iter(())
        out = {k: [] for k in [*PAIR_ROWS.names, "path", "dropped"]}
        for r, chosen, rejected in kept:
            ok = chosen is not None and rejected is not None
            refs = []
            for enc in (chosen, rejected) if ok else ():
                gold = np.asarray(next(scored)[2], dtype=np.float64)
                refs.append(float(gold[enc[1]].sum()))
            empty = (np.zeros(0, np.int32), np.zeros(0, bool))
            c, j = (chosen, rejected) if ok else (empty, empty)
            for key, value in (("sample_id", f"{r['prompt_id']}/{r['source']}"), ("domain", r["domain"]),
                               ("source", r["source"]), ("chosen_ids", c[0]), ("chosen_mask", c[1]),
                               ("rejected_ids", j[0]), ("rejected_mask", j[1]),
                               ("ref_chosen", refs[0] if ok else 0.0), ("ref_rejected", refs[1] if ok else 0.0),
                               ("chosen_len", int(c[1].sum())), ("rejected_len", int(j[1].sum())),
                               ("path", r["path"]), ("dropped", not ok)):
                out[key].append(value)
        return pa.Table.from_pydict({
            **{k: pa.array(out[k], PAIR_ROWS.field(k).type) for k in ("sample_id", "domain", "source", "ref_chosen",
                                                                      "ref_rejected", "chosen_len", "rejected_len")},
            **{k: ragged(out[k], t) for k, t in (("chosen_ids", pa.int32()), ("chosen_mask", pa.bool_()),
                                                 ("rejected_ids", pa.int32()), ("rejected_mask", pa.bool_()))},
            "path": pa.array(out["path"], pa.string()), "dropped": pa.array(out["dropped"], pa.bool_())})


def reference_pass(cfg: FusionConfig, reference: str, reference_fp: str, force: bool, log=print,
                   arm: str = FUSED_ARM) -> dict:
    """Encode and reference-score an arm's `pairs/…/dpo/` into its `dpo…_data/`; its manifest (as a dict)."""
    from fusion_ray.placement import engine_placement, ray_data_args

    pairs_dir = cfg.stage_dir("pairs")
    pairs = io.finished(pairs_dir, "pairs")
    imp = cfg.implicit
    fp = io.fingerprint("dpo_data", pairs["fingerprint"], reference_fp, cfg.data.max_length, imp.engine,
                        locations.fingerprint(cfg.pivot.tokenizer or cfg.pivot.path, revision=cfg.pivot.revision),
                        *([arm] if arm != FUSED_ARM else []))
    out = io.begin(data_dir(cfg, arm), fp, force)
    if out is None:
        return io.read_manifest(data_dir(cfg, arm))
    started = time.monotonic()
    rows_dir = arm_dir(cfg, "pairs", arm)
    shards = io.list_files(f"{rows_dir}/dpo")
    todo = [s for s in shards if not out.has(Path(s).name)]
    expected = {Path(s).name: [f"{p}/{s_}" for p, s_ in zip(*(io.read_table(s, columns=["prompt_id", "source"])
                                                               .column(c).to_pylist() for c in ("prompt_id", "source")),
                                                             strict=True)] for s in todo}
    scorer = engine_placement(tensor_parallel=1, pipeline_parallel=1, gpus=imp.num_gpus_per_actor,
                              cpus=imp.num_cpus_per_actor, accelerator_type=None)
    dropped = map_shards(todo, expected, out, RefScoreUDF, udf_kwargs={"cfg": cfg.to_wire(), "reference": reference},
                         keys=columns_key("sample_id"), batch_size=imp.batch_size, concurrency=imp.concurrency,
                         resources=ray_data_args(scorer), name=f"{arm_name('dpo', arm)}_reference",
                         what=f"dpo {arm_name('dpo', arm)} reference pass", dropped="dropped", empty=PAIR_ROWS)
    n_out = sum(io.parquet_metadata(out.path(Path(s).name)).num_rows for s in shards)
    if n_out == 0:
        raise ValueError(f"dpo: no preference pair to train on in {rows_dir}/dpo")
    n_in = sum(io.parquet_metadata(s).num_rows for s in shards)
    manifest = out.commit(io.Manifest(stage="dpo", fingerprint=fp, config_hash=cfg.config_hash(),
                                      rows={"in": n_in, "out": n_out},
                                      inputs={"pairs": pairs["fingerprint"], "reference": reference_fp},
                                      extra={"dropped_this_run": dropped}, wall_time_s=time.monotonic() - started),
                          config=cfg.to_dict())
    log(f"[dpo] {arm_name('dpo', arm)}: reference log-probs of {n_out} pair(s) ({time.monotonic() - started:.0f}s)")
    return dataclasses.asdict(manifest)


def train_arm(cfg: FusionConfig, arm: str, force: bool = False, log=print) -> StageResult:
    """One arm: the reference pass with its SFT model, then preference training from it."""
    from fusion_ray.trainer.fit import fit_target
    from fusion_ray.trainer.objective import Preference

    sft_dir = arm_dir(cfg, "sft", arm)
    sft = io.finished(sft_dir, "sft")
    from fusion_ray.checkpoint.adapter import dense_start

    sft_dir = dense_start(sft_dir)  # a LoRA SFT target: its merged/ weights are the reference and the start
    manifest = reference_pass(cfg, sft_dir, sft["fingerprint"], force, log, arm)
    d = cfg.implicit.dpo
    train = cfg.train.model_copy(update={k: v for k, v in (("lr", d.lr), ("epochs", d.epochs),
                                                           ("max_steps", d.max_steps)) if v is not None})
    objective = Preference(loss=d.loss, beta=d.beta, label_smoothing=d.label_smoothing,
                           gamma_beta_ratio=d.gamma_beta_ratio, nll_weight=d.nll_weight)
    return fit_target(cfg, objective=objective, train=train, name=arm_name("dpo", arm), arm="dpo",
                      data_dir=data_dir(cfg, arm), manifest=manifest, out_dir=arm_dir(cfg, "dpo", arm), stage="dpo",
                      input_name="dpo_data", init_path=sft_dir,
                      tracking_params={"sft_fingerprint": sft["fingerprint"]},
                      fingerprint_parts=(d.model_dump(mode="json"), sft["fingerprint"]), force=force, log=log)


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    """Every arm (`arms.py`): reference pass with its SFT model, then preference training."""
    from fusion_ray.ray_env import init_ray

    if cfg.implicit is None:
        raise ValueError("the dpo stage needs the `implicit` section (method: implicit)")
    init_ray(cfg.ray)
    return run_arms(cfg, "dpo", train_arm, force, log)
