"""Shared entry point of the one-stage jobs (`python -m jobs.<stage>`)."""

import argparse

from fusion_ray.cli import main


def run_stage(stage: str, doc: str) -> int:
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--config", required=True)
    parser.add_argument("--force", action="store_true")
    args, overrides = parser.parse_known_args()
    return main(["run", args.config, "--stages", stage, *overrides] + (["--force"] if args.force else []))
