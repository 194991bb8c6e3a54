"""The `sample` stage (implicit fusion): prompts → each source → n responses per prompt.

First the prompt corpora (`implicit.prompts`) are read and checked (`sample/prompts.py`)
into `samples/_prompts/part-*.parquet`, `implicit.shard_rows` prompts per shard. Then, per
source, Ray Data streams the prompt shards not yet sampled through a pool of engine actors
(`SampleUDF`: `implicit.concurrency` actors of `num_cpus_per_actor` / `num_gpus_per_actor`;
vLLM, or transformers with `implicit.engine: hf`), each applying the source's own chat
template and sampling settings (`sources[i].sampling`, else `implicit.sampling`) with
per-prompt seeds. Rows: (prompt_id, source, sample_index, response, tokens, finish_reason).

As in `collect`, the driver gathers a shard's rows, keeping the first copy of each
(prompt_id, sample_index) (a task retried after its actor died may send rows twice), and
writes the shard atomically once every prompt of it is in; a rerun samples only missing
shards; sources run side by side (`implicit.max_concurrent_models`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import pyarrow as pa

from fusion_ray import io, locations
from fusion_ray import tokenizer as tokenizers
from fusion_ray.config import FusionConfig, ModelSpec
from fusion_ray.contract import StageResult
from fusion_ray.placement import ray_data_args
from fusion_ray.schema import PROMPTS_DIR, SAMPLES
from fusion_ray.shards import columns_key, map_shards


def settings_for(cfg: FusionConfig, spec: ModelSpec, n: int):
    """The source's `SampleSettings` for prompts that want `n` samples; its seed is the run's seed
    and the source's name, so sources draw independently and reruns draw the same."""
    from fusion_ray.engines.sampling import SampleSettings

    s = spec.sampling or cfg.implicit.sampling
    seed = int(io.fingerprint("sample", cfg.implicit.seed, spec.name), 16) >> 1
    return SampleSettings(n=n, temperature=s.temperature, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                          max_tokens=s.max_tokens, seed=seed)


class SampleUDF:
    """Ray Data callable class: one engine per actor, prompt rows in, sample rows out."""

    def __init__(self, cfg: dict, model: str):
        from fusion_ray.engines import sampling as generate

        self.cfg = FusionConfig.from_wire(cfg)
        self.spec = next(m for m in self.cfg.sources if m.name == model)
        path = locations.local_dir(self.spec.path, revision=self.spec.revision)
        self.tokenizer = tokenizers.for_model(self.spec)
        dtype = self.spec.dtype
        if self.cfg.implicit.engine == "vllm":
            self.engine = generate.VLLMSampler(
                path, dtype=dtype, trust_remote_code=self.spec.trust_remote_code,
                max_model_len=self.spec.max_model_len,
                options={"tensor_parallel_size": self.spec.tensor_parallel_size,
                         "pipeline_parallel_size": self.spec.pipeline_parallel_size,
                         "gpu_memory_utilization": self.spec.gpu_memory_utilization,
                         **_placement(self.spec, self.cfg.implicit).engine_options()})
            self.context = self.engine.llm.llm_engine.model_config.max_model_len
        else:
            self.engine = generate.HFSampler(path, self.tokenizer, dtype=dtype,
                                             trust_remote_code=self.spec.trust_remote_code)
            self.context = self.spec.max_model_len or self.engine.model.config.max_position_embeddings
        self.max_tokens = settings_for(self.cfg, self.spec, 1).max_tokens  # the same for every n

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict] = []
        groups: dict[tuple[int, int], list[tuple[dict, list[int]]]] = {}
        for row in rows:
            text = self.tokenizer.apply_chat_template(json.loads(row["messages"]), add_generation_prompt=True,
                                                      tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            room = min(self.max_tokens, self.context - len(ids))
            if room < 1:  # recorded, not fatal: the prompt leaves no room for a response
                out += [self._row(row, i, "", 0, "prompt_too_long") for i in range(row["samples"])]
                continue
            groups.setdefault((row["samples"], room), []).append((row, ids))
        for (n, room), items in groups.items():
            settings = dataclasses.replace(settings_for(self.cfg, self.spec, n), max_tokens=room)
            drawn = self.engine.sample([ids for _, ids in items], [r["prompt_id"] for r, _ in items], settings)
            for (row, _), samples in zip(items, drawn, strict=True):
                out += [self._row(row, i, s.text, s.tokens, s.finish_reason) for i, s in enumerate(samples)]
        table = pa.Table.from_pylist(out, schema=SAMPLES)
        return table.append_column("path", pa.array([r.pop("_path") for r in out], pa.string()))

    def _row(self, row: dict, i: int, text: str, tokens: int, reason: str) -> dict:
        return {"prompt_id": row["prompt_id"], "source": self.spec.name, "sample_index": i, "response": text,
                "tokens": tokens, "finish_reason": reason, "_path": row["path"]}


def write_prompts(cfg: FusionConfig, force: bool, log=print) -> tuple[str, str]:
    """Read and check the prompt corpora into shards (once); (their dir, their fingerprint)."""
    from fusion_ray.sample.prompts import read_prompts

    imp = cfg.implicit
    out_dir = f"{cfg.stage_dir('sample')}/{PROMPTS_DIR}"
    fp = io.fingerprint("prompts", [c.model_dump(mode="json") for c in imp.prompts], imp.samples, imp.shard_rows,
                        [locations.fingerprint(c.path) for c in imp.prompts])
    out = io.begin(out_dir, fp, force)
    if out is None:
        return out_dir, fp
    table = read_prompts(imp.prompts, imp.samples)
    for k, start in enumerate(range(0, table.num_rows, imp.shard_rows)):
        out.write_table(f"part-{k:05d}.parquet", table.slice(start, imp.shard_rows))
    out.commit(io.Manifest(stage="sample", fingerprint=fp, config_hash=cfg.config_hash(),
                           rows={"in": table.num_rows, "out": table.num_rows},
                           extra={"part": "prompts", "per_domain": _counts(table, "domain")}), config=cfg.to_dict())
    log(f"[sample] {table.num_rows} prompt(s) in {-(-table.num_rows // imp.shard_rows)} shard(s)")
    return out_dir, fp


def _counts(table: pa.Table, column: str) -> dict[str, int]:
    from collections import Counter

    return dict(sorted(Counter(table.column(column).to_pylist()).items()))


def source_fingerprint(cfg: FusionConfig, spec: ModelSpec, prompts_fp: str) -> str:
    imp = cfg.to_dict()["implicit"]
    settings = {k: imp[k] for k in ("engine", "sampling", "seed")}
    return io.fingerprint("sample", spec.model_dump(mode="json", exclude={"arch"}), settings,
                          locations.fingerprint(spec.path, revision=spec.revision), prompts_fp)


def sample_source(cfg: FusionConfig, spec: ModelSpec, shards: list[str], prompts_fp: str, force: bool = False,
                  log=print) -> StageResult:
    """One source's samples over every prompt shard; resumes from finished shards."""

    out_dir = cfg.stage_dir("sample", spec.name)
    fp = source_fingerprint(cfg, spec, prompts_fp)
    started = time.monotonic()
    out = io.begin(out_dir, fp, force)
    if out is None:
        return StageResult.skipped(out_dir)
    todo = [s for s in shards if not out.has(Path(s).name)]
    expected = {}
    for s in todo:
        t = io.read_table(s, columns=["prompt_id", "samples"])
        expected[Path(s).name] = [(p, i) for p, n in zip(t.column("prompt_id").to_pylist(),
                                                         t.column("samples").to_pylist(), strict=True)
                                  for i in range(n)]
    imp = cfg.implicit
    map_shards(todo, expected, out, SampleUDF, udf_kwargs={"cfg": cfg.to_wire(), "model": spec.name},
               keys=columns_key("prompt_id", "sample_index"), batch_size=imp.batch_size,
               concurrency=imp.concurrency, resources=ray_data_args(_placement(spec, imp)),
               name=f"sample_{spec.name}", what=f"sample {spec.name}")
    files = [out.path(Path(s).name) for s in shards]
    table = pa.concat_tables([io.read_table(f, columns=["tokens", "finish_reason"]) for f in files])
    reasons = _counts(table, "finish_reason")
    tokens = int(pa.compute.sum(table.column("tokens")).as_py() or 0)
    rows = {"in": sum(len(v) for v in expected.values()), "out": table.num_rows}
    out.commit(io.Manifest(stage="sample", fingerprint=fp, config_hash=cfg.config_hash(), rows=rows,
                           inputs={"prompts": prompts_fp}, wall_time_s=time.monotonic() - started,
                           extra={"source": spec.name, "engine": cfg.implicit.engine, "tokens": tokens,
                                  "finish_reasons": reasons}), config=cfg.to_dict())
    from fusion_ray.progress import rate

    wall = time.monotonic() - started
    log(f"[sample] {spec.name}: {rate(table.num_rows, wall, 'responses')}, {rate(tokens, wall, 'tokens')}; "
        + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    return StageResult("done", [out.final], {"rows": rows, "tokens": tokens, "finish_reasons": reasons})


def _placement(spec: ModelSpec, imp):
    """An engine actor's resources: the source's parallel sizes with `vllm`, one device with `hf`."""
    from fusion_ray.placement import engine_placement

    vllm = imp.engine == "vllm"
    return engine_placement(tensor_parallel=spec.tensor_parallel_size if vllm else 1,
                            pipeline_parallel=spec.pipeline_parallel_size if vllm else 1,
                            gpus=imp.num_gpus_per_actor, cpus=imp.num_cpus_per_actor, accelerator_type=None)


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    """Sample every source on the implicit prompts (sources side by side, `implicit.max_concurrent_models`)."""
    from fusion_ray.parallel import run_parts
    from fusion_ray.ray_env import init_ray

    if cfg.implicit is None:
        raise ValueError("the sample stage needs the `implicit` section (method: implicit)")
    reserved = [s.name for s in cfg.sources if s.name == PROMPTS_DIR]
    if reserved:
        raise ValueError(f"sources: the name {PROMPTS_DIR!r} is reserved for the prompt shards")
    for spec in cfg.sources:  # fail before any work: every tokenizer loads and has a chat template
        tok = tokenizers.for_model(spec)
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"sources.{spec.name}: its tokenizer has no chat template")
    prompts_dir, prompts_fp = write_prompts(cfg, force, log)
    init_ray(cfg.ray)
    shards = io.list_files(prompts_dir)
    parts = {s.name: functools.partial(sample_source, cfg, s, shards, prompts_fp, force, log) for s in cfg.sources}
    outcomes = run_parts(parts, cfg.implicit.max_concurrent_models, thread_prefix="sample")
    return StageResult.of_outcomes(outcomes)
