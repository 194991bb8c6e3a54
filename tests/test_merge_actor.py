"""MergeActor on local Ray: split tensors give the same bytes; the pipeline's merge stage."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusion_ray import io
from fusion_ray.merge import actor, engine
from fusion_ray.merge import stage as merge_stage
from fusion_ray.merge.spec import parse_spec
from tests.helpers import chat_rows, make_config, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def perturbed(src: Path, dst: Path, seed: int) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    w = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in w.items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_actors_split_the_tensors_and_write_the_same_bytes(ray_local, tiny_models, tmp_path):
    base = tiny_models("qwen2", "gpt2", vocab_size=512, layers=2)
    ft1, ft2 = perturbed(base, tmp_path / "a", 1), perturbed(base, tmp_path / "b", 2)
    spec = parse_spec({"models": [{"model": str(ft1)}, {"model": str(ft2)}], "base_model": str(base),
                       "merge_method": "dare_ties", "parameters": {"weight": 0.5, "density": 0.4},
                       "shard_size_mb": 1})
    engine.run_merge(spec, str(tmp_path / "one"), seed=5, threads=1)
    actor.merge_standalone(spec, str(tmp_path / "three"), seed=5, num_actors=3)
    one, three = weights(tmp_path / "one"), weights(tmp_path / "three")
    base_w = weights(base)
    assert one.keys() == three.keys() == base_w.keys()
    for name in one:  # the same DARE masks; whole-tensor float32 sums may differ in the last bit
        assert torch.equal(one[name] == base_w[name], three[name] == base_w[name])  # with the torch thread count
        assert torch.allclose(one[name], three[name], rtol=1e-6, atol=1e-7)


def test_merge_stage_merges_pivot_and_trained_targets(ray_local, tiny_models, tmp_path):
    pivot = tiny_models("qwen2", "gpt2", vocab_size=512, layers=2)
    corpus = write_jsonl(tmp_path / "c.jsonl", chat_rows(4))
    cfg = make_config(tmp_path / "work", pivot, {"s1": pivot, "s2": pivot}, [corpus],
                      merge={"method": "sce", "variant": "fusechat", "parameters": {"select_topk": 0.5},
                             "num_actors": 2})
    with pytest.raises(FileNotFoundError, match="run `train` first"):
        merge_stage.run(cfg)
    for i, (_, pair) in enumerate(cfg.source_pairs()):  # what `train` leaves: HF dirs with a manifest
        out = io.StageOutput(cfg.stage_dir("train", pair), f"fp{i}")
        perturbed(pivot, Path(out.dir), i)
        out.commit(io.Manifest(stage="train", fingerprint=f"fp{i}", config_hash="x"))
    result = merge_stage.run(cfg, log=lambda *_: None)
    merged = Path(cfg.stage_dir("merge"))
    assert result.status == "done" and (merged / "_manifest.json").exists()
    assert json.loads((merged / "_manifest.json").read_text())["extra"]["method"] == "sce"
    assert "pivot" in (merged / "README.md").read_text() or str(pivot) in (merged / "README.md").read_text()
    assert merge_stage.run(cfg).status == "skipped"


def test_config_names_an_unknown_merge_parameter(tiny_models, tmp_path):
    from fusion_ray.config import ConfigError

    pivot = tiny_models("qwen2", "gpt2", vocab_size=512, layers=2)
    corpus = write_jsonl(tmp_path / "c.jsonl", chat_rows(2))
    with pytest.raises(ConfigError, match=r"merge: unknown parameter\(s\) densty for merge method ties"):
        make_config(tmp_path, pivot, {"s": pivot}, [corpus], merge={"method": "ties", "parameters": {"densty": 1}})
