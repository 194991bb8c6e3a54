"""The pipeline's last stage: serve the merged model (`merged/`) with the config's `serve` section.

It deploys and returns; the application lives as long as the Ray it runs on (a cluster
keeps it after the driver exits; `fusion-ray run` keeps a local Ray up until Ctrl-C).
"""

from __future__ import annotations

from fusion_ray.config import FusionConfig
from fusion_ray.contract import StageResult
from fusion_ray.io import exists


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    """Deploy `cfg.stage_dir("merge")`; returns status `deployed`, figures `url` and `model`.

    Raises:
        FileNotFoundError: there is no merged model yet.
    """
    from fusion_ray.serve.app import deploy

    model_dir = cfg.stage_dir("merge")
    if not exists(f"{model_dir}/config.json"):
        raise FileNotFoundError(f"serve: no merged model at {model_dir}; run the merge stage first")
    args = {**cfg.serve.model_dump(), "model_dir": model_dir, "model_id": cfg.serve.model_id or cfg.name}
    url = deploy(args, cfg.ray)
    log(f"[serve] {args['model_id']} ({cfg.serve.engine}) at {url}")
    return StageResult("deployed", [model_dir], {"url": url, "model": args["model_id"]})
