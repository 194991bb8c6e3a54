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
