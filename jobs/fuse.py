"""`python -m jobs.fuse --config CONFIG [--force] [key=value ...]`: run the `fuse` stage alone.

Submit it to a cluster like the whole pipeline:
    ray job submit --working-dir . -- python -m jobs.fuse --config jobs/configs/tiny_cpu.yaml
"""

import sys

from jobs._stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("fuse", __doc__))
