"""`python -m jobs.stage STAGE --config CONFIG [--force] [key=value ...]`: one stage of either method.

STAGE is any stage of the config's method: prepare, collect, align, fuse, train, merge, eval, serve
(explicit) or sample, reward, pairs, sft, dpo, eval (implicit). The stages before it must have
run (their outputs are read from the workdir); a stage that is already done is skipped unless
`--force`. Submit it to a cluster like the whole pipeline:

    ray job submit --working-dir . -- python -m jobs.stage train --config jobs/configs/tiny_cpu.yaml
    ray job submit --working-dir . -- python -m jobs.stage dpo --config jobs/configs/fusechat3_8b.yaml
"""

import argparse
import sys

from fusion_ray.cli import main
from fusion_ray.config import ALL_STAGES


def stage_argv(argv: list[str]) -> list[str]:
    """This entry's arguments → `fusion-ray run`'s."""
    parser = argparse.ArgumentParser(prog="python -m jobs.stage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=ALL_STAGES)
    parser.add_argument("--config", required=True)
    parser.add_argument("--force", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    return ["run", args.config, "--stages", args.stage, *overrides] + (["--force"] if args.force else [])


if __name__ == "__main__":
    sys.exit(main(stage_argv(sys.argv[1:])))
