"""The `align` stage on Ray Data: each source's `logits/` → `aligned/<source>/` on pivot terms.

Shards are the unit of work: shard i of `prepared/`, `logits/<pivot>/` and
`logits/<source>/` hold the same samples in the same order (collect keeps them so);
each Ray Data task joins them by `sample_id` (checked row by row), aligns positions
by offsets (DTW where offsets do not meet), moves the source's top-k onto pivot ids
and writes `aligned/<source>/<shard>` atomically. A rerun redoes only missing shards.
The `statistics` vocabulary map needs one counting pass over the corpus first (the
same tasks, counting instead of writing); maps are cached per tokenizer pair.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from fusion_ray import io, schema
from fusion_ray.align import offsets as offsets_lib
from fusion_ray.align import project, spans, vocab
from fusion_ray.arrays import ragged, rows_of
from fusion_ray.config import FusionConfig, ModelSpec
from fusion_ray.contract import StageResult
from fusion_ray.distributions import score
from fusion_ray.locations import cache_root
from fusion_ray.schema import ShardMismatch, read_shard
from fusion_ray.tokenizer import for_model


def joined_rows(cfg: FusionConfig, source: str, name: str):
    """Yield (prepared row, pivot row, source row) of one shard, checked to match."""
    files = {"prepared": f"{cfg.stage_dir('prepare')}/{name}",
             "pivot": f"{cfg.stage_dir('collect', cfg.pivot.name)}/{name}",
             "source": f"{cfg.stage_dir('collect', source)}/{name}"}
    tables = {k: read_shard(f, "prepared" if k == "prepared" else "logits") for k, f in files.items()}
    prepared, pivot, src = (rows_of(tables[k]) for k in ("prepared", "pivot", "source"))
    if not len(prepared) == len(pivot) == len(src):
        raise ShardMismatch(f"{files['source']}: {len(src)} rows, but {files['pivot']} has {len(pivot)} "
                            f"and {files['prepared']} {len(prepared)}")
    for prep, p, s in zip(prepared, pivot, src, strict=True):
        if not prep["sample_id"] == p["sample_id"] == s["sample_id"]:
            raise ShardMismatch(f"sample {s['sample_id']!r} in {files['source']} does not match sample "
                                f"{p['sample_id']!r} in {files['pivot']} (same row)")
        if max(s["offsets"].max(initial=0), p["offsets"].max(initial=0)) > len(prep["text"]):
            raise ShardMismatch(f"sample {s['sample_id']!r}: token offsets in {files['source']} run past "
                                f"the prepared text ({len(prep['text'])} chars): the texts differ")
        yield prep, p, s


def check_join(cfg: FusionConfig, sources: list[str], names: list[str]) -> None:
    """Before any work: every shard of each source holds the pivot's samples, in order."""
    def ids(path: str) -> list[str]:
        schema.check_file(path, "logits")
        return io.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()

    for name in names:
        want = ids(f"{cfg.stage_dir('collect', cfg.pivot.name)}/{name}")
        for source in sources:
            path = f"{cfg.stage_dir('collect', source)}/{name}"
            got = ids(path)
            bad = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
            if bad is not None or len(got) != len(want):
                row = bad if bad is not None else min(len(got), len(want))
                sample = got[row] if row < len(got) else "(missing)"
                raise ShardMismatch(f"sample {sample!r} in {path} (row {row}) does not match the pivot's "
                                    f"sample {want[row] if row < len(want) else '(missing)'!r}")


class Aligner:
    """Everything one source's alignment needs, built once per worker from the config."""

    def __init__(self, cfg: FusionConfig, source: ModelSpec):
        self.cfg, self.source = cfg, source
        self.p_tok, self.s_tok = for_model(cfg.pivot), for_model(source)
        self.p_marker, self.s_marker = vocab.space_marker(self.p_tok), vocab.space_marker(self.s_tok)
        self._first = None

    @property
    def first(self) -> tuple[spans.FirstPiece, list[str]]:
        """The pivot's first-piece lookup and the source surfaces (built on first use)."""
        if self._first is None:
            self._first = (spans.FirstPiece(self.p_tok, vocab.surfaces(self.p_tok)), vocab.surfaces(self.s_tok))
        return self._first

    def specials(self) -> dict[int, int]:
        """Source id → pivot id always: bos → bos, eos → eos."""
        s, p = self.s_tok, self.p_tok
        return {i: j for i, j in ((s.bos_token_id, p.bos_token_id), (s.eos_token_id, p.eos_token_id))
                if i is not None and j is not None}

    def dtw(self, p: dict, s: dict) -> list[list[int]]:
        from fusion_ray.align.dtw import dtw_align

        return dtw_align(self.s_tok.convert_ids_to_tokens(s["input_ids"].tolist()),
                         self.p_tok.convert_ids_to_tokens(p["input_ids"].tolist()),
                         source_marker=self.s_marker, pivot_marker=self.p_marker,
                         tie_break=self.cfg.align.tie_break)

    def positions(self, prep: dict, p: dict, s: dict) -> tuple[np.ndarray, str]:
        fallback = (lambda: self.dtw(p, s)) if self.cfg.align.dtw_fallback else None
        return project.align_positions(p["offsets"], s["offsets"], len(prep["text"]), fallback)

    def pairs(self, prep: dict, p: dict, s: dict) -> tuple[np.ndarray, np.ndarray]:
        """Aligned (pivot id, source id) token pairs of one sample, for the statistics map."""
        if offsets_lib.meet(p["offsets"], s["offsets"], len(prep["text"])):
            mapping = offsets_lib.pivot_to_source(p["offsets"], s["offsets"])
        elif self.cfg.align.dtw_fallback:
            mapping = self.dtw(p, s)
        else:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        lengths = np.array([len(m) for m in mapping])
        return np.repeat(p["input_ids"], lengths), s["input_ids"][np.concatenate(mapping)]

    def count(self, name: str) -> np.ndarray:
        """Sparse co-alignment counts of one shard."""
        parts = [vocab.count_pairs(*self.pairs(*row), len(self.s_tok))
                 for row in joined_rows(self.cfg, self.source.name, name)]
        return vocab.merge_counts(parts)

    def align(self, name: str, vmap: np.ndarray, out_dir: str) -> int:
        """Align one shard and write it atomically; returns its row count."""
        c, rows = self.cfg.collect, []
        kw = {"k": c.top_k, "fallback": self.cfg.align.fallback, "pivot_scored_only": c.scored_only,
              "source_scored_only": c.scored_only}
        for prep, p, s in joined_rows(self.cfg, self.source.name, name):
            if self.cfg.align.positions == "spans" and offsets_lib.meet(p["offsets"], s["offsets"],
                                                                       len(prep["text"])):
                out = spans.transfer_spans(p, s, prep["text"], vmap, *self.first, prefix=self.cfg.align.prefix,
                                           gold=self.cfg.align.gold, **kw)
                method = "spans"
            else:
                pos_map, method = self.positions(prep, p, s)
                out = project.transfer(p, s, pos_map, vmap, **kw)
            n_scored = int(np.sum(s["loss_mask"]))
            rows.append({"sample_id": p["sample_id"], **out, "method": method,
                         "source_ce": score(s["nll_sum"], n_scored, s["n_bytes"], "ce"),
                         "source_bpb": score(s["nll_sum"], n_scored, s["n_bytes"], "bpb")})
        io.write_parquet_atomic(f"{out_dir}/{name}", aligned_table(rows))
        return len(rows)


class ShardUDF:
    """Ray Data callable class: one `Aligner` per actor; each batch row names a shard."""

    def __init__(self, cfg: dict, source: str, task: str, vmap: np.ndarray | None = None,
                 out_dir: str | None = None):
        cfg_obj = FusionConfig.from_wire(cfg)
        self.aligner = Aligner(cfg_obj, next(s for s in cfg_obj.sources if s.name == source))
        self.task, self.vmap, self.out_dir = task, vmap, out_dir

    def __call__(self, batch: dict) -> dict:
        names = list(batch["shard"])
        if self.task == "count":
            counts = [self.aligner.count(n) for n in names]
            return {"shard": names, "counts": [c.reshape(-1) for c in counts]}
        return {"shard": names, "rows": [self.aligner.align(n, self.vmap, self.out_dir) for n in names]}


def over_shards(cfg: FusionConfig, source: ModelSpec, names: list[str], task: str, **kw) -> list[dict]:
    """Run `ShardUDF` over shard names on a pool of `align.workers` actors (progress shown)."""
    import ray

    ds = ray.data.from_items([{"shard": n} for n in names])
    return ds.map_batches(ShardUDF, batch_size=1, fn_constructor_kwargs={
        "cfg": cfg.to_wire(), "source": source.name, "task": task, **kw},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.align.workers),
        num_cpus=cfg.align.num_cpus).take_all()


def shard_stats(paths: list[str]) -> dict:
    """Rows, scored positions, transferred positions and alignment methods of written shards."""
    totals = {"rows": 0, "positions": 0, "transferred": 0, "offsets": 0, "spans": 0, "dtw": 0, "none": 0}
    for path in paths:
        table = io.read_table(path, columns=["transferred", "method"])
        flags = table.column("transferred").combine_chunks().flatten()
        totals["rows"] += table.num_rows
        totals["positions"] += len(flags)
        totals["transferred"] += int(pa.compute.sum(flags).as_py() or 0)
        for method in table.column("method").to_pylist():
            totals[method] += 1
    return totals


def aligned_table(rows: list[dict]) -> pa.Table:
    columns = {
        "sample_id": pa.array([r["sample_id"] for r in rows], pa.string()),
        "topk_ids": ragged([r["topk_ids"] for r in rows], pa.int32()),
        "topk_logprobs": ragged([r["topk_logprobs"].astype(np.float16) for r in rows], pa.float16()),
        "transferred": ragged([r["transferred"] for r in rows], pa.bool_()),
        "source_ce": pa.array([r["source_ce"] for r in rows], pa.float64()),
        "source_bpb": pa.array([r["source_bpb"] for r in rows], pa.float64()),
        "method": pa.array([r["method"] for r in rows], pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=schema.ALIGNED)


def vocab_map(cfg: FusionConfig, source: ModelSpec, shards: list[str], inputs_fp: str, log=print) -> np.ndarray:
    """The configured source → pivot map, from the on-disk cache when it was built before."""
    aligner = Aligner(cfg, source)
    kind = cfg.align.vocab_map
    key = [kind, vocab.tokenizer_hash(aligner.s_tok), vocab.tokenizer_hash(aligner.p_tok)]
    if kind == "statistics":
        key += [inputs_fp, cfg.align.unseen, cfg.align.dtw_fallback, cfg.align.tie_break, "exact-first"]
    path = cache_root() / "vocab_maps" / f"{kind}-{io.fingerprint(*key)}.npy"
    s_surf, p_surf = vocab.surfaces(aligner.s_tok), vocab.surfaces(aligner.p_tok)
    if kind == "exact":
        return vocab.cached(path, lambda: vocab.exact_map(s_surf, p_surf))
    if kind == "mined":
        return vocab.cached(path, lambda: vocab.mined_map(s_surf, p_surf))
    if kind == "first_piece":
        return vocab.cached(path, lambda: spans.FirstPiece(aligner.p_tok, p_surf).vocab_map(
            s_surf, aligner.specials()))

    def build() -> np.ndarray:
        done = over_shards(cfg, source, [Path(s).name for s in shards], "count")
        counts = vocab.merge_counts([np.asarray(r["counts"]).reshape(-1, 2) for r in done])
        log(f"[align] {source.name}: {len(counts)} distinct aligned (pivot, source) token pairs")
        s, p = aligner.s_tok, aligner.p_tok
        unseen = {"drop": -1, "unk": p.unk_token_id if p.unk_token_id is not None else p.eos_token_id}
        fallback = unseen.get(cfg.align.unseen)
        if fallback is None:  # "mined"
            fallback = vocab.cached(path.with_name(f"mined-{io.fingerprint('mined', *key[1:3])}.npy"),
                                    lambda: vocab.mined_map(s_surf, p_surf))
        return vocab.statistics_map(counts, s_surf, p_surf, source_vocab=len(s), specials=aligner.specials(),
                                    unseen_to=fallback)

    return vocab.cached(path, build)


def align_source(cfg: FusionConfig, source: ModelSpec, force: bool = False, log=print) -> StageResult:
    manifests = {m: io.read_manifest(cfg.stage_dir("collect", m)) for m in (cfg.pivot.name, source.name)}
    missing = [m for m, v in manifests.items() if v is None]
    if missing:
        raise FileNotFoundError(f"no finished collect stage for {', '.join(missing)}: run `collect` first")
    prepared = {m: v["inputs"].get("prepared") for m, v in manifests.items()}
    if len(set(prepared.values())) != 1:
        raise ShardMismatch(f"{cfg.stage_dir('collect', source.name)} and "
                            f"{cfg.stage_dir('collect', cfg.pivot.name)} were collected from different "
                            f"prepared texts ({prepared})")
    out_dir = cfg.stage_dir("align", source.name)
    inputs = {m: v["fingerprint"] for m, v in manifests.items()}
    fp = io.fingerprint("align", cfg.to_dict()["align"], cfg.collect.top_k, inputs)
    started = time.monotonic()
    out = io.begin(out_dir, fp, force)
    if out is None:
        return StageResult.skipped(out_dir)
    shards = io.list_files(cfg.stage_dir("collect", source.name))
    check_join(cfg, [source.name], [Path(s).name for s in shards])
    vmap = vocab_map(cfg, source, shards, io.fingerprint(inputs), log)
    todo = [Path(s).name for s in shards if not out.has(Path(s).name)]
    if todo:
        over_shards(cfg, source, todo, "align", vmap=vmap, out_dir=out.dir)
    totals = shard_stats([out.path(Path(s).name) for s in shards])
    fraction = totals["transferred"] / max(totals["positions"], 1)
    extra = {"source": source.name, "vocab_map": cfg.align.vocab_map, "fallback": cfg.align.fallback,
             "pivot_vocab": len(for_model(cfg.pivot)),
             "transferred_fraction": round(fraction, 4), "mapped_source_ids": int((vmap >= 0).sum()),
             "alignment": {k: totals[k] for k in ("offsets", "spans", "dtw", "none")},
             "resumed_shards": len(shards) - len(todo)}
    out.commit(io.Manifest(stage="align", fingerprint=fp, config_hash=cfg.config_hash(), inputs=inputs,
                           rows={"in": totals["rows"], "out": totals["rows"]}, extra=extra,
                           wall_time_s=time.monotonic() - started), config=cfg.to_dict())
    from fusion_ray.progress import rate

    log(f"[align] {source.name}: {rate(totals['rows'], time.monotonic() - started)}; "
        f"{fraction:.1%} of scored pivot positions transferred "
        f"({extra['alignment']})")
    return StageResult("done", [out_dir], {"transferred_fraction": fraction})


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    """Align every source onto the pivot (`parts`: one result per source)."""
    from fusion_ray.ray_env import init_ray

    init_ray(cfg.ray)
    return StageResult.of_parts({s.name: align_source(cfg, s, force, log) for s in cfg.sources})
