"""`python -m jobs.pipeline --config CONFIG [--stages a,b] [--force] [key=value ...]`."""

import argparse
import sys

from fusion_ray.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--stages")
    parser.add_argument("--force", action="store_true")
    args, overrides = parser.parse_known_args()
    argv = ["run", args.config, *overrides] + (["--stages", args.stages] if args.stages else [])
    sys.exit(main(argv + (["--force"] if args.force else [])))
