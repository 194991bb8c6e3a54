"""The report's chart (evaluate/report.py): Δ bpb against the CLM-only arm, per arm and domain."""

import pytest

from fusion_ray.evaluate import report as report_lib

BPB = {"source:computing": {"computing": 2.10, "english": 2.40}, "pivot": {"computing": 2.56, "english": 2.23},
       "clm_only": {"computing": 2.000, "english": 1.800}, "fused:min_ce": {"computing": 1.990, "english": 1.812},
       "merged": {"computing": 1.985, "english": 1.796}}


def bars(fig):
    """{arm: [bar height per domain]} of the chart's bar containers."""
    ax = fig.axes[0]
    return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}


def test_the_chart_plots_each_trained_arm_against_clm_only():
    fig = report_lib.figure({"config": "t", "bpb": BPB})
    heights = bars(fig)
    assert list(heights) == ["fused:min_ce", "merged"], "the arms the CLM-only arm is the baseline of"
    assert heights["fused:min_ce"] == pytest.approx([-0.010, +0.012])  # domains sorted: computing, english
    assert heights["merged"] == pytest.approx([-0.015, -0.004])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["computing", "english"]
    assert any(list(line.get_ydata()) == [0, 0] for line in ax.get_lines()), "a zero line"
    labels = {t.get_text() for t in ax.texts}
    assert {"-0.0100", "+0.0120", "-0.0150", "-0.0040"} <= labels, labels
    assert "CLM-only" in ax.get_ylabel()


def test_without_a_clm_only_arm_the_chart_shows_absolute_bpb():
    bpb = {k: v for k, v in BPB.items() if k in ("source:computing", "pivot")}
    heights = bars(report_lib.figure({"config": "t", "bpb": bpb}))
    assert heights == {"source:computing": [2.10, 2.40], "pivot": [2.56, 2.23]}
    assert report_lib.chart({"config": "t", "bpb": BPB})[:4] == b"\x89PNG"


def test_a_stage_of_parts_reports_its_own_wall_time_not_the_sum_of_its_parts(tmp_path):
    """Collect's models and train's arms run side by side: the report's wall time is the stage's
    own (the pipeline's record of its last run), never the sum of its parts' times; a stage of
    parts without that record shows none rather than a sum."""
    import json
    from types import SimpleNamespace

    from fusion_ray import io

    workdir = tmp_path / "w"
    for part, wall in (("pivot", 300.0), ("english", 320.0)):
        io.write_json_atomic(str(workdir / "logits" / part / "_manifest.json"), {"stage": "collect",
                                                                                 "wall_time_s": wall})
    io.write_json_atomic(str(workdir / "prepared" / "_manifest.json"), {"stage": "prepare", "wall_time_s": 4.0})
    for arm in ("english", "clm_only"):
        io.write_json_atomic(str(workdir / "targets" / arm / "_manifest.json"), {"stage": "train", "wall_time_s": 70})
    (workdir / "_stage_stats.json").write_text(json.dumps({"collect": {"last_run_wall_s": 323.6, "peak_rss_mb": 900}}))
    dirs = {"prepare": "prepared", "collect": "logits", "train": "targets"}
    cfg = SimpleNamespace(workdir=str(workdir), stages=lambda: ["prepare", "collect", "train", "eval"],
                          stage_dir=lambda stage: str(workdir / dirs[stage]))
    stats = report_lib.stage_stats(cfg)
    assert stats == {"prepare": {"wall_time_s": 4.0}, "collect": {"wall_time_s": 323.6, "peak_rss_mb": 900},
                     "train": {"wall_time_s": None}}
    md = report_lib.markdown({"bpb": BPB, "models": {}, "stages": stats, "source_domain": {"computing": "computing",
                                                                             "helper": None}})
    assert "| collect | 323.6 | 900 |" in md and "| train |  |  |" in md
    assert "computing → computing, helper (no domain given)" in md and "None" not in md
