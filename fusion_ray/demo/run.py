"""`fusion-ray demo`: build the embedded default's assets and run every pipeline stage on them."""

from __future__ import annotations

import time

from fusion_ray.demo.builds import ensure_assets
from fusion_ray.pipeline import PIPELINE_STAGES, run_stages


def run_demo(workdir: str | None = None, force: bool = False, log=print) -> int:
    """Run the tiny CPU pipeline end to end, offline; print what was built and where."""
    from fusion_ray.config import load_config
    from fusion_ray.demo.assets import default_demo_config

    started = time.monotonic()
    root = ensure_assets(log=log)
    log(f"[demo] assets: {root}")
    print_assets(root, log)
    overrides = [f"workdir={workdir}"] if workdir else []
    cfg = load_config(default_demo_config(), overrides)
    results = run_stages(cfg, PIPELINE_STAGES, force=force, log=log)
    log(f"[demo] stages run: {', '.join(results) or 'none'}")
    log(f"[demo] workdir: {cfg.workdir}  ({time.monotonic() - started:.1f}s)")
    report = results["eval"].figures.get("report") if "eval" in results else None
    if report:
        log(f"[demo] report: {report}  (also report.json and report.png beside it)")
    return 0


def demo_workdir(workdir: str | None = None) -> str:
    """The workdir a demo run writes to: `workdir`, else the embedded default config's, absolute."""
    from fusion_ray import locations
    from fusion_ray.demo.assets import default_demo_config
    from fusion_ray.yamlfile import read_yaml_file

    return locations.absolute(workdir or read_yaml_file(default_demo_config())["workdir"], path_only=True)


def print_assets(root, log=print) -> None:
    import json

    summary = json.loads((root / "build.json").read_text())
    for name, info in summary["corpus"].items():
        log(f"[demo]   corpus {name:<18} {info['rows']:>7} rows {info['bytes'] / 1e6:7.2f} MB")
    for name, card in summary["models"].items():
        bpb = ", ".join(f"{d} {v:.3f}" for d, v in card["heldout_bpb"].items())
        log(f"[demo]   model  {name:<18} {card['architecture']:<8} {card['tokenizer']:<9} "
            f"vocab {card['vocab_size']:>5} params {card['parameters']:>9,} "
            f"{card['bytes'] / 1e6:6.2f} MB  held-out bpb: {bpb}")
    log(f"[demo]   built in {summary['build_seconds']}s (cached afterwards)")
