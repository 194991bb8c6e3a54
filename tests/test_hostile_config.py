"""Hostile configs: alias bombs, python tags, invalid YAML, oversized values, a workdir that is a file.

Each CLI case runs `python -m fusion_ray.cli` as a subprocess under an address-space limit
(`LIMIT_AS`, far above what a normal `validate` needs, far below what an expanded bomb
needs) and a timeout, and must end in exit 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fusion_ray.config import (
    ConfigError,
    ServeConfig,
    bounded_repr,
    format_errors,
    load_config,
    parse_config,
)
from fusion_ray.yamlfile import MAX_YAML_BYTES, load_yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny_cpu.yaml"
LIMIT_AS = 1536 << 20  # `validate` of tiny_cpu.yaml peaks at 300-500 MB of address space (no torch)
TIMEOUT_S = 60


def cli(*args: str, cwd: Path = REPO, limit: bool = True) -> subprocess.CompletedProcess:
    """`fusion-ray ARGS` as a subprocess of this interpreter (PYTHONPATH inherited), bounded."""

    def bound() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))

    return subprocess.run([sys.executable, "-m", "fusion_ray.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT_S, preexec_fn=bound if limit else None,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})


def assert_one_line(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert len(lines[0]) < 1000
    return lines[0]


def bomb(levels: int = 10, width: int = 10, indent: str = "", prefix: str = "lol") -> str:
    """YAML lines of a 'billion laughs': `width ** levels` scalars from a few hundred bytes."""
    lines = [f"{indent}{prefix}0: &{prefix}0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"{indent}{prefix}{i}: &{prefix}{i} [" + ", ".join([f"*{prefix}{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def tiny_with(tmp_path: Path, old: str, new: str, name: str = "cfg.yaml") -> Path:
    text = TINY.read_text()
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new).replace("workdir: runs/tiny_cpu", f"workdir: {tmp_path / 'w'}"))
    return path


SERVE_LINE = "serve: {engine: hf, port: 8000, max_tokens_cap: 256}"


def test_a_normal_validate_fits_the_limit():
    out = cli("validate", str(TINY))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_alias_bomb_in_the_config_is_refused_by_validate(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"name: x\nworkdir: {tmp_path / 'w'}\n" + bomb())
    assert path.stat().st_size < 1000
    started = time.monotonic()
    line = assert_one_line(cli("validate", str(path)), str(path), "aliases expand it to more than 100,000 nodes",
                           "line 7, column 7")  # lol4: the first alias that expands past 100k
    assert time.monotonic() - started < TIMEOUT_S
    assert line.startswith("invalid config ")


def test_alias_bomb_in_serve_engine_options_is_refused_before_run(tmp_path):
    path = tiny_with(tmp_path, SERVE_LINE, "serve:\n  engine: hf\n  engine_options:\n" + bomb(indent="    "))
    for command in ("validate", "plan", "run", "prepare", "merge"):  # `merge CONFIG`: the pipeline stage
        assert_one_line(cli(command, str(path)), "aliases expand it to more than 100,000 nodes")
    assert not (tmp_path / "w").exists(), "run did nothing"


def test_alias_bomb_in_an_override_is_refused(tmp_path):
    flow = "{" + bomb().strip().replace("\n", ", ") + "}"
    out = cli("validate", str(TINY), f"serve.engine_options={flow}")
    assert_one_line(out, "override serve.engine_options", "aliases expand it")


def test_alias_bomb_in_a_standalone_merge_spec_is_refused(tmp_path):
    spec = tmp_path / "merge.yaml"
    spec.write_text("merge_method: linear\nmodels: [{model: a}, {model: b}]\nparameters:\n" + bomb(indent="  "))
    assert_one_line(cli("merge", str(spec), str(tmp_path / "out")), str(spec), "aliases expand it")
    assert not (tmp_path / "out").exists()


def test_text_bomb_and_recursive_alias_are_refused():
    big = "a: &a '" + "x" * 200_000 + "'\nb: [*a, *a, *a, *a, *a, *a]\n"
    with pytest.raises(ConfigError, match=r"s\.yaml: refused YAML at line 2, column 4: .*more than 1 MiB of text"):
        load_yaml(big, "s.yaml")
    with pytest.raises(ConfigError, match="recursive structure"):
        load_yaml("a: &a [1, *a]\n", "s.yaml")
    with pytest.raises(ConfigError, match="recursive structure"):
        load_yaml("a: &a {<<: *a}\n", "s.yaml")
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        load_yaml("[" * 100_000, "s.yaml")
    nested = "a: &a " + "[" * 40 + "1" + "]" * 40 + "\nb: " + "[" * 40 + "*a" + "]" * 40 + "\n"
    with pytest.raises(ConfigError, match="aliases expand it deeper than 64 levels"):
        load_yaml(nested, "s.yaml")


def test_plain_aliases_and_merge_keys_still_work():
    data = load_yaml("base: &b {dtype: float32, domain: x}\nm: {<<: *b, name: p}\nl: [*b, *b]\n", "s.yaml")
    assert data["m"] == {"dtype": "float32", "domain": "x", "name": "p"}
    assert data["l"] == [data["base"], data["base"]]


def test_cluster_config_is_read_with_the_same_bounds(tmp_path):
    from fusion_ray.resources import load_cluster

    path = tmp_path / "cluster.yaml"
    path.write_text("cluster_name: c\navailable_node_types:\n" + bomb(indent="  "))
    with pytest.raises(ConfigError, match="aliases expand it"):
        load_cluster(path)


def test_python_tags_are_refused_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    for args in (("validate", str(evil)), ("merge", str(evil), str(tmp_path / "out"))):
        assert_one_line(cli(*args), str(evil), "line 1, column 7",
                        "tag !!python/object/apply:os.system is not allowed")
    out = cli("validate", str(TINY), f'name=!!python/object/apply:os.system ["touch {marker}"]')
    assert_one_line(out, "override name", "is not allowed")
    assert not marker.exists()


def test_invalid_yaml_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nworkdir: w\nsources: [a, b]]\n")
    for args in (("validate", str(bad)), ("merge", str(bad), str(tmp_path / "out")),
                 ("plan", str(TINY), "--cluster", str(bad))):
        assert_one_line(cli(*args), str(bad), "not valid YAML at line 3, column 16", "found ']'")
    tab = tmp_path / "tab.yaml"
    tab.write_text("a:\n\tb: 1\n")
    assert_one_line(cli("validate", str(tab)), "not valid YAML at line 2, column 1", "'\\t'")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"name: a\nworkdir: \x00\n")
    assert_one_line(cli("validate", str(nul)), "not valid YAML at line 2, column 10", "U+0000")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    assert_one_line(cli("validate", str(latin)), "not valid UTF-8 at byte 9")


def test_yaml_files_over_the_size_bound_are_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * MAX_YAML_BYTES + "\n")
    assert_one_line(cli("validate", str(path)), str(path), "larger than 1 MiB")


def test_a_huge_value_is_refused_at_validate_naming_its_key(tmp_path):
    # 300k non-ASCII chars: 600 KB of YAML (under the file bound), 1.7 MiB as JSON (\u00e9 each)
    path = tiny_with(tmp_path, SERVE_LINE, "serve: {engine: hf, engine_options: {blob: '" + "é" * 300_000 + "'}}")
    assert_one_line(cli("validate", str(path)), "serve.engine_options.blob: too large",
                    "over the 1 MiB bound on a config")
    with pytest.raises(ConfigError, match="serve.engine_options.blob: too large"):
        load_config(path)


def test_a_value_json_cannot_hold_is_refused_at_validate(tmp_path):
    path = tiny_with(tmp_path, SERVE_LINE, "serve: {engine: hf, engine_options: {b: !!binary '/w=='}}")
    assert_one_line(cli("validate", str(path)), "serve: cannot be written as JSON")


def test_a_shared_structure_built_in_python_is_refused_without_walking_it():
    dag: list = ["x"] * 10
    for _ in range(11):  # 10^12 leaves if expanded
        dag = [dag] * 10
    data = yaml.safe_load(TINY.read_text())
    data["serve"]["engine_options"] = {"dag": dag}
    started = time.monotonic()
    with pytest.raises(ConfigError, match="serve.engine_options.dag: too large"):
        parse_config(data)
    assert time.monotonic() - started < 5


def test_error_values_are_shown_with_a_bounded_repr():
    dag: list = [1] * 10
    for _ in range(11):
        dag = [dag] * 10
    started = time.monotonic()
    with pytest.raises(ValidationError) as err:
        ServeConfig.model_validate({"port": dag, "host": ["h" * 10_000_000], "model_id": 10 ** 100_000})
    lines = format_errors(err.value)
    assert time.monotonic() - started < 5
    assert len(lines) == 3 and all(len(line) < 500 for line in lines), lines
    assert any(line.startswith("port:") and "[[[[" in line for line in lines)
    assert bounded_repr(10 ** 100_000) == "<int of 332193 bits>"
    assert len(bounded_repr(b"\xff" * 10**6)) < 400 and len(bounded_repr({"k": "v" * 10**6})) < 400


def test_run_with_a_workdir_that_is_a_file_fails_in_one_line_before_any_work(tmp_path):
    workdir = tmp_path / "afile"
    workdir.write_text("keep me")
    for command in ("run", "prepare"):
        assert_one_line(cli(command, str(TINY), f"workdir={workdir}", limit=False),
                        f"workdir {workdir} is a file, not a directory")
    out = cli("run", str(TINY), f"workdir={workdir}/sub", limit=False)
    assert_one_line(out, f"{workdir} is a file, not a directory")
    out = cli("validate", str(TINY), f"workdir={workdir}")
    assert out.returncode == 2 and "is a file, not a directory" in out.stderr and "Traceback" not in out.stderr
    assert workdir.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_demo_with_a_workdir_that_is_a_file_fails_before_building_assets(tmp_path):
    workdir = tmp_path / "afile"
    workdir.write_text("")
    out = cli("demo", "--workdir", str(workdir), limit=False)
    assert_one_line(out, "is a file, not a directory")
    assert "[demo]" not in out.stdout


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"name: x\nworkdir: {tmp_path / 'w'}\n" + bomb())
    for args in (("--debug", "validate", str(path)), ("validate", str(path), "--debug")):
        out = cli(*args)
        assert out.returncode != 0
        assert "Traceback" in out.stderr and "ConfigError" in out.stderr and "aliases expand it" in out.stderr


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), st.text(alphabet=st.sampled_from(list("[]{}:,-&*!|>'\"#%@`?~.<= \n\t\\aby01e")))),
       st.lists(st.sampled_from(["a: &a [1, 2]", "b: [*a, *a]", "c: *a", "<<: *a", "!!binary x", "!!set {a}",
                                 "- &x {k: v}", "- *x", "? [1]", ": 1", "--- ", "...", "%YAML 1.1",
                                 "!!python/name:os.system", "2001-13-45", "0x" + "f" * 80, "1" * 5000]),
                max_size=6))
def test_fuzz_yaml_text_gives_a_value_or_a_config_error(text, pieces):
    for candidate in (text, "\n".join(pieces), text + "\n" + "\n".join(pieces)):
        try:
            load_yaml(candidate, "fuzz.yaml")
        except ConfigError as err:
            assert str(err).startswith("fuzz.yaml: ") and "\n" not in str(err)


def test_a_model_dir_with_a_garbage_config_json_does_not_crash_validate(tmp_path):
    for name, text in (("list", "[1, 2]"), ("deep", "[" * 100_000), ("str_vocab", '{"vocab_size": "x"}')):
        model = tmp_path / name
        model.mkdir()
        (model / "config.json").write_text(text)
        out = cli("validate", str(TINY), f"pivot.path={model}")
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
