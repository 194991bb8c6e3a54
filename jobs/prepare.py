"""`python -m jobs.prepare --config CONFIG [--force] [key=value ...]`: run the `prepare` stage alone.

Submit it to a cluster like the whole pipeline:
    ray job submit --working-dir . -- python -m jobs.prepare --config jobs/configs/tiny_cpu.yaml
"""

import sys

from jobs._stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("prepare", __doc__))
