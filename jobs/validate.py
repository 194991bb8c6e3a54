"""`python -m jobs.validate --config CONFIG [key=value ...]`: check a config, print bad fields."""

import argparse
import sys

from fusion_ray.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args()
    sys.exit(main(["validate", args.config, *overrides]))
