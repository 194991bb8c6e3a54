"""`python -m jobs.eval --config CONFIG [--force] [key=value ...]`: run the `eval` stage alone.

Submit it to a cluster like the whole pipeline:
    ray job submit --working-dir . -- python -m jobs.eval --config jobs/configs/tiny_cpu.yaml
"""

import sys

from jobs._stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("eval", __doc__))
