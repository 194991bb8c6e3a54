"""`python -m jobs.collect --config CONFIG [--force] [key=value ...]`: run the `collect` stage alone.

Submit it to a cluster like the whole pipeline:
    ray job submit --working-dir . -- python -m jobs.collect --config jobs/configs/tiny_cpu.yaml
"""

import sys

from jobs._stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("collect", __doc__))
