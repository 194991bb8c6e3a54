"""The `collect` stage on Ray Data: prepared rows → each model → `logits/<model>/` shards.

Per model, Ray Data reads the prepared shards not yet collected, and a pool of
engine actors (`ScoreUDF`, `concurrency` actors of `num_cpus_per_actor` /
`num_gpus_per_actor`) tokenizes each batch with the model's own tokenizer and
scores it (vLLM or transformers). The driver gathers rows per input shard,
de-duplicated by `sample_id` (a retried task after an actor is killed may send a
row twice), and writes each output shard atomically once all its rows are in:
every input row lands exactly once, and a rerun redoes only missing shards.

A vLLM engine actor gets tensor × pipeline parallel size GPUs (`fusion_ray.placement`),
and the models' pipelines run side by side, each driven by its own driver thread
(`collect.max_concurrent_models`).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion_ray import io, locations, schema
from fusion_ray import tokenizer as tokenizers
from fusion_ray.arrays import ragged
from fusion_ray.config import FusionConfig, ModelSpec
from fusion_ray.contract import StageResult
from fusion_ray.engines.topk import logits_row
from fusion_ray.placement import collect_placement, ray_data_args
from fusion_ray.shards import columns_key, map_shards


class ScoreUDF:
    """Ray Data callable class: one engine per actor, batches of prepared rows in, logits rows out."""

    def __init__(self, cfg: dict, model: str):
        from fusion_ray.engines import scoring as engines

        full = FusionConfig.from_wire(cfg)
        spec = next(m for m in full.models() if m.name == model)
        collect, max_length, pivot = full.collect, full.data.max_length, conditioned_on(full, spec)
        self.cfg = collect
        path = locations.local_dir(spec.path, revision=spec.revision)  # once per node, then cached
        self.tokenizer = tokenizers.for_model(spec)
        self.pivot_tokenizer = self.index = None
        if pivot is not None:  # a source, with `align.prefix: exact`: the pivot's boundaries too
            from fusion_ray.engines.conditioned import PrefixIndex
            from fusion_ray.tokenizer import surfaces

            self.pivot_tokenizer = tokenizers.for_model(pivot)
            self.surfaces = surfaces(self.tokenizer)
            self.index = PrefixIndex(self.surfaces, self.tokenizer.all_special_ids)
        placement = collect_placement(spec, collect)
        dtype = spec.dtype if collect.dtype == "auto" else collect.dtype
        common = dict(dtype=dtype, trust_remote_code=spec.trust_remote_code)
        if collect.engine == "vllm":
            # the conditioned masses need the full distribution at some positions: vLLM gives
            # hidden states and the output layer runs here
            kind = engines.VLLMHiddenEngine if pivot is not None else engines.VLLMEngine
            self.engine = kind(
                path, k=collect.top_k, max_model_len=spec.max_model_len or 2 * max_length + 16,
                tensor_parallel_size=spec.tensor_parallel_size,
                pipeline_parallel_size=spec.pipeline_parallel_size,
                gpu_memory_utilization=spec.gpu_memory_utilization,
                **placement.engine_options(), **common)
        else:
            self.engine = engines.HFEngine(path, max_rows=collect.batch_size, **common)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        enc = self.tokenizer(texts, return_offsets_mapping=True)
        offsets = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in enc["offset_mapping"]]
        reqs = None
        if self.pivot_tokenizer is not None:
            from fusion_ray.engines.conditioned import requests

            pivot = self.pivot_tokenizer(texts, return_offsets_mapping=True)
            reqs = [requests(text, enc["input_ids"][i], offsets[i][:, 1], self.surfaces,
                             np.asarray(pivot["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)[:, 1],
                             np.arange(len(offsets[i]) - 1))
                    for i, text in enumerate(texts)]
            scored = self.engine.score(enc["input_ids"], self.cfg.top_k, cond=reqs, index=self.index)
        else:
            scored = self.engine.score(enc["input_ids"], self.cfg.top_k)
        rows = []
        for i, text in enumerate(texts):
            rows.append(logits_row(
                batch.column("sample_id")[i].as_py(), text, enc["input_ids"][i], offsets[i],
                batch.column("span_starts")[i].as_py(), batch.column("span_ends")[i].as_py(),
                scored[i], scored_only=self.cfg.scored_only, requests=None if reqs is None else reqs[i]))
        table = rows_to_table(rows)
        return table.append_column("path", batch.column("path"))


def rows_to_table(rows: list[dict]) -> pa.Table:
    """`logits/` rows (numpy arrays inside) → a table of the LOGITS schema."""
    columns = {
        "sample_id": pa.array([r["sample_id"] for r in rows], pa.string()),
        **{key: ragged([r[key] for r in rows], typ) for key, typ in (
            ("input_ids", pa.int32()), ("offsets", pa.int32()), ("loss_mask", pa.bool_()),
            ("topk_ids", pa.int32()), ("topk_logprobs", pa.float16()), ("gold_logprob", pa.float32()))},
        "nll_sum": pa.array([r["nll_sum"] for r in rows], pa.float64()),
        "n_bytes": pa.array([r["n_bytes"] for r in rows], pa.int64()),
    }
    if rows and "cond_rows" in rows[0]:
        columns.update({field.name: ragged([r[field.name] for r in rows], field.type.value_type
                                           if not pa.types.is_list(field.type.value_type)
                                           else field.type.value_type.value_type)
                        for field in schema.CONDITIONED})
        return pa.Table.from_pydict(columns, schema=pa.schema([*schema.LOGITS, *schema.CONDITIONED]))
    return pa.Table.from_pydict(columns, schema=schema.LOGITS)


def preflight(cfg: FusionConfig) -> None:
    """Fail before any work: every tokenizer loads and `top_k` fits every vocabulary (hub models
    included, whose vocabulary validation cannot see)."""
    for model in cfg.models():
        cfg.collect.check_top_k(model.name, len(tokenizers.for_model(model)))


def conditioned_on(cfg: FusionConfig, model: ModelSpec) -> ModelSpec | None:
    """The pivot, when `model` is a source whose exact conditioned entries align needs
    (`align.prefix: exact`, engines/conditioned.py); else None."""
    if cfg.align.prefix != "exact" or model.name == cfg.pivot.name:
        return None
    return cfg.pivot


def model_fingerprint(cfg: FusionConfig, model: ModelSpec, prepared_fp: str) -> str:
    settings = {k: v for k, v in cfg.to_dict()["collect"].items() if k != "max_concurrent_models"}  # scheduling only
    parts = [model.model_dump(mode="json", exclude={"arch"}), settings, cfg.data.max_length,
             locations.fingerprint(model.path, revision=model.revision), prepared_fp]
    pivot = conditioned_on(cfg, model)
    if pivot is not None:  # its boundaries decide which entries are collected
        parts += ["conditioned", locations.fingerprint(pivot.tokenizer or pivot.path, revision=pivot.revision)]
    return io.fingerprint("collect", *parts)


def collect_model(cfg: FusionConfig, model: ModelSpec, shards: list[str], prepared_fp: str,
                  force: bool = False, log=print) -> StageResult:
    """Collect one model's top-k over every prepared shard; resumes from finished shards."""

    out_dir = cfg.stage_dir("collect", model.name)
    fp = model_fingerprint(cfg, model, prepared_fp)
    started = time.monotonic()
    out = io.begin(out_dir, fp, force)
    if out is None:
        return StageResult.skipped(out_dir)
    todo = [s for s in shards if not out.has(Path(s).name)]
    expected = {Path(s).name: io.read_table(s, columns=["sample_id"])
                .column("sample_id").to_pylist() for s in todo}
    c = cfg.collect
    map_shards(todo, expected, out, ScoreUDF, udf_kwargs={"cfg": cfg.to_wire(), "model": model.name},
               keys=columns_key("sample_id"), batch_size=c.batch_size, concurrency=c.concurrency,
               resources=ray_data_args(collect_placement(model, c)),  # TP × PP GPUs per engine actor
               name=f"collect_{model.name}", what=f"collect {model.name}", columns=list(schema.PREPARED.names))
    return _commit(cfg, model, out, shards, fp, prepared_fp, started, log)


def _commit(cfg, model, out, shards, fp, prepared_fp, started, log) -> StageResult:
    files = [out.path(Path(s).name) for s in shards]
    meta = [io.parquet_metadata(f) for f in files]
    n_rows = sum(m.num_rows for m in meta)
    n_bytes = sum(m.serialized_size + sum(m.row_group(g).total_byte_size for g in range(m.num_row_groups))
                  for m in meta)
    rows = {"in": n_rows, "out": n_rows}
    out.commit(io.Manifest(stage="collect", fingerprint=fp, config_hash=cfg.config_hash(), rows=rows,
                           inputs={"prepared": prepared_fp},
                           wall_time_s=time.monotonic() - started,
                           extra={"model": model.name, "engine": cfg.collect.engine,
                                  "top_k": cfg.collect.top_k, "scored_only": cfg.collect.scored_only,
                                  "approx_bytes": n_bytes}), config=cfg.to_dict())
    from fusion_ray.progress import rate

    log(f"[collect] {model.name}: {rate(n_rows, time.monotonic() - started)}, {len(files)} shard(s)")
    return StageResult("done", [out.final], {"rows": rows})


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    """Collect top-k log-probs of the pivot and every source over the prepared corpus.

    Each model is its own Ray Data pipeline, driven by its own driver thread,
    `collect.max_concurrent_models` at a time (None: all; `fusion_ray.parallel`); each
    model's result (`parts`) carries its wall-clock `started_at` / `finished_at`.
    """
    from fusion_ray.parallel import run_parts
    from fusion_ray.ray_env import init_ray

    prepared = cfg.stage_dir("prepare")
    manifest = io.finished(prepared, "prepare")
    preflight(cfg)
    init_ray(cfg.ray)
    shards = io.list_files(prepared)
    parts = {m.name: functools.partial(collect_model, cfg, m, shards, manifest["fingerprint"], force, log)
             for m in cfg.models()}
    outcomes = run_parts(parts, cfg.collect.max_concurrent_models, thread_prefix="collect")
    return StageResult.of_outcomes(outcomes)
