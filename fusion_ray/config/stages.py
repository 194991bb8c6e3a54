"""The stages of each fusion method, in order, and the directory each writes below `workdir`.

Explicit fusion (FuseLLM / FuseChat, `method: explicit`) distils the sources' aligned
distributions into the pivot, then merges; implicit fusion (FuseChat-3.0, `method: implicit`)
samples the sources, scores, and trains the pivot by SFT then DPO.
"""

STAGES = ("prepare", "collect", "align", "fuse", "train", "merge", "eval", "serve")
# Implicit fusion (FuseChat-3.0, `method: implicit`): the sources' sampled responses, scored,
# make SFT rows and DPO pairs for the target (the pivot). Built so far: `sample`, `reward`, `pairs`, `sft`, `dpo`.
IMPLICIT_STAGES = ("sample", "reward", "pairs", "sft", "dpo", "eval")
METHOD_STAGES = {"explicit": STAGES, "implicit": IMPLICIT_STAGES}
ALL_STAGES = tuple(dict.fromkeys(STAGES + IMPLICIT_STAGES))
# Output directory of each stage below `workdir`.
STAGE_DIRS = {"prepare": "prepared", "collect": "logits", "align": "aligned", "fuse": "fused",
              "train": "targets", "merge": "merged", "eval": "report", "serve": "serve",
              "sample": "samples", "reward": "rewards", "pairs": "pairs", "sft": "sft", "dpo": "dpo"}
