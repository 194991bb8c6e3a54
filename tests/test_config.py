"""The typed config: every shipped YAML validates; bad input names each bad field."""

from pathlib import Path

import pytest
import yaml

from fusion_ray.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
PIPELINE_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def test_repo_ships_both_configs():
    names = {p.name for p in PIPELINE_CONFIGS}
    assert {"tiny_cpu.yaml", "fusechat_7b.yaml"} <= names


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.stage_dir("collect", cfg.pivot.name).startswith(cfg.workdir.rstrip("/"))


def _tiny() -> dict:
    return yaml.safe_load((REPO / "jobs" / "configs" / "tiny_cpu.yaml").read_text())


def test_overrides_apply_dotted_keys_and_list_items(tmp_path):
    cfg = load_config(REPO / "jobs/configs/tiny_cpu.yaml",
                      ["train.lambda_clm=0.5", "sources.1.dtype=bfloat16", "workdir=/tmp/w"])
    assert cfg.train.lambda_clm == 0.5
    assert cfg.sources[1].dtype == "bfloat16"
    assert cfg.stage_dir("train", "computing") == "/tmp/w/targets/computing"
    assert cfg.stage_dir("collect", "pivot") == "/tmp/w/logits/pivot"


def test_every_bad_field_is_reported_with_its_dotted_path(tmp_path):
    data = _tiny()
    data["pivot"]["dtyp"] = "float32"
    data["sources"][0]["path"] = "./no/such/model"
    data["data"]["train"][1]["format"] = "xml"
    data["train"]["lambda_clm"] = 1.5
    data["colect"] = {}
    with pytest.raises(ConfigError) as err:
        parse_config(data, "bad.yaml")
    text = "\n".join(err.value.errors)
    assert len(err.value.errors) == 5, text
    for needle in ("pivot.dtyp: unknown key", "sources.0.path: model path does not exist: ./no/such/model",
                   "data.train.1.format", "train.lambda_clm", "colect: unknown key"):
        assert needle in text


def test_missing_corpus_file_and_unknown_demo_asset_fail(tmp_path):
    data = _tiny()
    data["data"]["heldout"][0]["path"] = str(tmp_path / "missing.jsonl")
    data["pivot"]["path"] = "demo:not_an_asset"
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    text = "\n".join(err.value.errors)
    assert f"corpus path does not exist: {tmp_path / 'missing.jsonl'}" in text
    assert "unknown demo asset 'not_an_asset'" in text


def test_hub_ids_and_uris_are_allowed_without_checking():
    data = _tiny()
    data["pivot"]["path"] = "openchat/openchat_3.5"
    data["data"]["train"][0]["path"] = "s3://bucket/corpus.parquet"
    cfg = parse_config(data)
    assert cfg.pivot.path == "openchat/openchat_3.5"


def test_existing_local_paths_are_accepted(tmp_path):
    corpus = tmp_path / "chat.jsonl"
    corpus.write_text("{}\n")
    data = _tiny()
    data["data"]["train"] = [{"path": str(corpus)}]
    assert parse_config(data).data.train[0].path == str(corpus)


def test_derived_values():
    cfg = load_config(REPO / "jobs/configs/fusechat_7b.yaml")
    assert cfg.world_size() == 8
    assert cfg.train.grad_accum_steps() == 128 // (2 * 8)
    assert cfg.source_pairs() == [("openchat", "mixtral"), ("openchat", "solar"), ("openchat", "internlm")]
    multi = load_config(REPO / "jobs/configs/fusechat_7b.yaml", ["fuse.mode=multi"])
    assert multi.source_pairs() == [("openchat", "mixtral+solar+internlm")]


def test_batch_sizes_must_divide():
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size"):
        load_config(REPO / "jobs/configs/tiny_cpu.yaml", ["train.num_workers=3"])


def test_duplicate_model_names_rejected():
    data = _tiny()
    data["sources"][1]["name"] = "computing"
    with pytest.raises(ConfigError, match="repeated: computing"):
        parse_config(data)


def test_config_hash_tracks_sections():
    a = load_config(REPO / "jobs/configs/tiny_cpu.yaml")
    b = load_config(REPO / "jobs/configs/tiny_cpu.yaml", ["train.lr=0.002"])
    assert a.config_hash() != b.config_hash()
    assert a.config_hash("collect", "pivot") == b.config_hash("collect", "pivot")
    assert a.config_hash("train") != b.config_hash("train")


def test_bad_override_syntax_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(REPO / "jobs/configs/tiny_cpu.yaml", ["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
