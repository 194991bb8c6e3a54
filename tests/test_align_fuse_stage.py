"""Align and fuse stages on a real local Ray: contracts, exactness, routing, bad input."""

import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from fusion_ray import io, schema
from fusion_ray.align import stage as align
from fusion_ray.collect import stage as collect
from fusion_ray.fuse import stage as fuse
from fusion_ray.prepare import stage as prepare

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def run(tiny_fused):
    """The shared run (conftest's `tiny_fused`): sources gpt, mis and twin (the pivot's own
    tokenizer), 14 computing and 10 English rows, spans with the first-piece map."""
    return {"cfg": tiny_fused.cfg, "tmp": tiny_fused.tmp}


def test_aligned_outputs_follow_the_contract(run):
    cfg = run["cfg"]
    pivot = pq.read_table(cfg.stage_dir("collect", "pivot"))
    n_scored = [int(np.sum(m)) for m in pivot.column("loss_mask").to_pylist()]
    for source in ("gpt", "mis", "twin"):
        out = cfg.stage_dir("align", source)
        for f in io.list_files(out):
            schema.check_file(f, "aligned")
        table = pq.read_table(out)
        assert table.column("sample_id").to_pylist() == pivot.column("sample_id").to_pylist()
        assert [len(t) for t in table.column("transferred").to_pylist()] == n_scored
        manifest = io.read_manifest(out)
        assert manifest["extra"]["alignment"] == {"offsets": 0, "spans": 24, "dtw": 0, "none": 0}
        assert 0.3 < manifest["extra"]["transferred_fraction"] <= 1.0
        ids = np.concatenate([np.array(r).reshape(-1) for r in table.column("topk_ids").to_pylist()])
        assert ids.min() >= 0 and ids.max() < 515, "valid pivot ids"


def test_same_tokenizer_source_transfers_everything_unchanged(run):
    cfg = run["cfg"]
    manifest = io.read_manifest(cfg.stage_dir("align", "twin"))
    assert manifest["extra"]["transferred_fraction"] == 1.0
    src = pq.read_table(cfg.stage_dir("collect", "twin")).slice(3, 1).to_pylist()[0]
    got = pq.read_table(cfg.stage_dir("align", "twin")).slice(3, 1).to_pylist()[0]
    mask = np.array(src["loss_mask"])
    want_ids, want_lp = np.array(src["topk_ids"])[mask], np.array(src["topk_logprobs"], np.float32)[mask]
    for ids, lps, w_ids, w_lps in zip(got["topk_ids"], got["topk_logprobs"], want_ids, want_lp):
        assert dict(zip(ids, lps)) == dict(zip(w_ids.tolist(), w_lps.tolist()))  # same (id, log-prob) set


def test_fused_pairwise_with_min_ce_and_routing(run):
    cfg = run["cfg"]
    for source in ("gpt", "mis", "twin"):
        out = cfg.stage_dir("fuse", source)
        for f in io.list_files(out):
            schema.check_file(f, "fused")
        table = pq.read_table(out)
        weights = np.array(table.column("weights").to_pylist())
        assert weights.shape == (24, 2) and np.all(weights.sum(1) == 1) and set(np.unique(weights)) <= {0, 1}
        routing = io.read_manifest(out)["extra"]["routing"]
        assert set(routing) == {"computing", "english"}
        assert sum(sum(d["wins"].values()) for d in routing.values()) == 24
    # the winner is the candidate with the lower score in the configured unit, row by row: per byte of
    # the same text (bpb, the default) or per token of each model's own tokenization (ce)
    pivot = pq.read_table(cfg.stage_dir("collect", "pivot")).to_pylist()
    aligned = pq.read_table(cfg.stage_dir("align", "gpt")).to_pylist()
    fused = pq.read_table(cfg.stage_dir("fuse", "gpt")).to_pylist()
    per_byte = cfg.fuse.metric == "bpb"
    for p, a, f in zip(pivot, aligned, fused):
        if per_byte:
            pivot_score, source_score = p["nll_sum"] / (p["n_bytes"] * math.log(2)), a["source_bpb"]
        else:
            pivot_score, source_score = p["nll_sum"] / sum(p["loss_mask"]), a["source_ce"]
        assert f["weights"] == ([1.0, 0.0] if pivot_score <= source_score else [0.0, 1.0])
        chosen = p if f["weights"][0] else None
        if chosen is None:
            assert f["topk_ids"] == a["topk_ids"]


def test_multi_mode_with_avg_ce(run, tmp_path):
    cfg = run["cfg"]
    multi = cfg.model_copy(deep=True)
    multi.workdir = str(tmp_path / "w")
    shutil.copytree(cfg.workdir, multi.workdir)
    multi.fuse.mode, multi.fuse.strategy = "multi", "avg_ce"
    result = fuse.run(multi, log=QUIET)
    (pair,) = result.parts
    assert pair == "gpt+mis+twin"
    table = pq.read_table(multi.stage_dir("fuse", pair))
    weights = np.array(table.column("weights").to_pylist())
    assert weights.shape == (24, 4) and np.allclose(weights.sum(1), 1, atol=1e-6)
    assert weights.min() > 0.2, "AvgCE weights are nearly uniform"
    probs = [np.exp(np.array(lp, np.float64)).sum(1) for lp in table.column("topk_logprobs").to_pylist()]
    assert max(p.max() for p in probs) <= 1 + 2e-3


def test_reruns_are_skipped_and_the_map_is_cached(run):
    cfg = run["cfg"]
    assert {s: r.status for s, r in align.run(cfg, log=QUIET).parts.items()} == \
        {"gpt": "skipped", "mis": "skipped", "twin": "skipped"}
    from fusion_ray.demo.assets import cache_root

    assert list((cache_root() / "vocab_maps").glob("first_piece-*.npy"))


def test_mismatched_rows_fail_naming_sample_and_file(run, tmp_path):
    cfg = run["cfg"]
    bad = cfg.model_copy(deep=True)
    bad.workdir = str(tmp_path / "w")
    shutil.copytree(cfg.workdir, bad.workdir)
    shard = f"{bad.stage_dir('collect', 'gpt')}/part-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), shard)  # rows out of order
    with pytest.raises(align.ShardMismatch, match=r"sample 'computing-9' in .*logits/gpt/part-00000.parquet \(row 0\)"):
        align.align_source(bad, bad.sources[0], force=True, log=QUIET)


def test_sources_collected_from_different_texts_are_refused(run, tmp_path):
    import json

    cfg = run["cfg"]
    bad = cfg.model_copy(deep=True)
    bad.workdir = str(tmp_path / "w")
    shutil.copytree(cfg.workdir, bad.workdir)
    path = f"{bad.stage_dir('collect', 'mis')}/_manifest.json"
    manifest = json.loads(open(path).read())
    manifest["inputs"]["prepared"] = "another-corpus"
    open(path, "w").write(json.dumps(manifest))
    with pytest.raises(align.ShardMismatch, match="collected from different prepared texts"):
        align.align_source(bad, bad.sources[1], force=True, log=QUIET)


def test_storing_scored_positions_only_gives_the_same_teacher(run, tmp_path):
    cfg = run["cfg"]
    lean = cfg.model_copy(deep=True)
    lean.workdir = str(tmp_path / "lean")
    lean.collect.scored_only = True
    lean.sources = [s for s in lean.sources if s.name == "gpt"]
    for stage in (prepare, collect, align, fuse):
        stage.run(lean, log=QUIET)
    full_rows = pq.read_table(cfg.stage_dir("collect", "gpt")).to_pylist()
    lean_rows = pq.read_table(lean.stage_dir("collect", "gpt")).to_pylist()
    assert sum(len(r["topk_ids"]) for r in lean_rows) < sum(len(r["topk_ids"]) for r in full_rows)
    a, b = pq.read_table(cfg.stage_dir("fuse", "gpt")), pq.read_table(lean.stage_dir("fuse", "gpt"))
    for col in ("sample_id", "topk_ids", "topk_logprobs", "transferred", "weights"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col


def test_span_transfer_reaches_more_positions_and_keeps_the_one_to_one_ones(run, tmp_path):
    cfg = run["cfg"]
    strict = cfg.model_copy(deep=True)
    strict.workdir = str(tmp_path / "w")
    shutil.copytree(cfg.workdir, strict.workdir)
    strict.align.positions = "one_to_one"  # the same map (first_piece): 1-1 positions must agree
    for source in ("gpt", "mis"):
        spec = next(s for s in strict.sources if s.name == source)
        align.align_source(strict, spec, force=True, log=QUIET)
        one = io.read_manifest(strict.stage_dir("align", source))
        span = io.read_manifest(cfg.stage_dir("align", source))
        assert one["extra"]["alignment"] == {"offsets": 24, "spans": 0, "dtw": 0, "none": 0}
        assert one["extra"]["transferred_fraction"] < span["extra"]["transferred_fraction"], source
        a, b = pq.read_table(strict.stage_dir("align", source)), pq.read_table(cfg.stage_dir("align", source))
        for ra, rb in zip(a.to_pylist(), b.to_pylist(), strict=True):
            for t, ids, lps, span_ids, span_lps in zip(ra["transferred"], ra["topk_ids"], ra["topk_logprobs"],
                                                        rb["topk_ids"], rb["topk_logprobs"], strict=True):
                if t:  # a 1-1 position: the same distribution either way (same vocabulary map)
                    assert dict(zip(ids, lps)) == dict(zip(span_ids, span_lps))
            assert all(rb["transferred"][i] for i, t in enumerate(ra["transferred"]) if t)


def test_statistics_map_runs_with_one_to_one_positions_and_prefers_exact_surfaces(run, tmp_path):
    """FuseChat-2's map (one_to_one positions): built from the corpus, cached; a source token whose
    surface the pivot has maps to that pivot token whatever the co-alignment counts say."""
    from fusion_ray.align import vocab
    from fusion_ray.align.stage import Aligner
    from fusion_ray.demo.assets import cache_root

    cfg = run["cfg"]
    stats = cfg.model_copy(deep=True)
    stats.workdir = str(tmp_path / "w")
    shutil.copytree(cfg.workdir, stats.workdir)
    stats.align.positions = "one_to_one"
    stats.align.vocab_map = "statistics"
    spec = next(s for s in stats.sources if s.name == "gpt")
    align.align_source(stats, spec, force=True, log=QUIET)
    assert io.read_manifest(stats.stage_dir("align", "gpt"))["extra"]["vocab_map"] == "statistics"
    inputs = {m: io.read_manifest(stats.stage_dir("collect", m))["fingerprint"] for m in (stats.pivot.name, "gpt")}
    shards = io.list_files(stats.stage_dir("collect", "gpt"))
    vmap = align.vocab_map(stats, spec, shards, io.fingerprint(inputs), log=QUIET)  # the cached one
    assert list((cache_root() / "vocab_maps").glob("statistics-*.npy"))
    aligner = Aligner(stats, spec)
    s_surf, p_surf = vocab.surfaces(aligner.s_tok), vocab.surfaces(aligner.p_tok)
    exact = vocab.exact_map(s_surf, p_surf)
    specials = aligner.specials()
    shared = [i for i in range(len(s_surf)) if exact[i] >= 0 and i not in specials]
    assert len(shared) > 100 and all(vmap[i] == exact[i] for i in shared)


def test_spans_refuses_a_map_it_cannot_marginalise_with():
    from fusion_ray.config import AlignConfig

    with pytest.raises(ValueError, match="first_piece"):
        AlignConfig(positions="spans", vocab_map="statistics")
    assert AlignConfig(positions="one_to_one").vocab_map == "statistics"
    assert AlignConfig().vocab_map == "first_piece" and AlignConfig().positions == "spans"
