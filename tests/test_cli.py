"""The `fusion-ray` console script, run as users run it (a subprocess)."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXE = shutil.which("fusion-ray", path=str(Path(sys.executable).parent))


def run(*args, cwd=REPO):
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_console_script_is_installed():
    assert EXE, "the fusion-ray console script is not installed beside this python"


def test_validate_good_config():
    out = run("validate", "jobs/configs/tiny_cpu.yaml")
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_validate_bad_config_names_every_field_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    workdir = tmp_path / "work"
    bad.write_text(
        f"name: bad\nworkdir: {workdir}\n"
        "pivot: {name: p, path: ./missing_model, colour: red}\n"
        "sources: [{name: s, path: /nonexistent/source}]\n"
        "data: {train: [{path: /nonexistent/data.jsonl}], max_length: -3}\n"
    )
    out = run("validate", str(bad), cwd=tmp_path)
    assert out.returncode == 2
    for needle in ("pivot.path", "./missing_model", "pivot.colour: unknown key", "sources.0.path",
                   "/nonexistent/source", "data.train.0.path", "data.max_length"):
        assert needle in out.stderr, out.stderr
    assert not workdir.exists()
    assert list(tmp_path.iterdir()) == [bad]


def test_validate_applies_overrides():
    out = run("validate", "jobs/configs/tiny_cpu.yaml", "train.strategy=horovod")
    assert out.returncode == 2
    assert "train.strategy" in out.stderr


def test_unknown_stage_in_list_is_an_error():
    out = run("run", "jobs/configs/tiny_cpu.yaml", "--stages", "colect")
    assert out.returncode != 0
    assert "colect" in out.stderr


def test_stages_that_disagree_fail_at_validation_before_any_work(tmp_path):
    out = run("validate", "jobs/configs/tiny_cpu.yaml", "merge.method=slerp", "merge.parameters={t: 0.5}",
              "data.heldout=[]",
              f"workdir={tmp_path}/w")
    assert out.returncode == 2, out.stderr
    assert "merge.method: slerp takes 2 models (pivot included)" in out.stderr
    assert "trains 2 target(s)" in out.stderr and "data.heldout: the eval stage needs" in out.stderr
    run_out = run("run", "jobs/configs/tiny_cpu.yaml", "merge.method=slerp", "merge.parameters={t: 0.5}",
                  f"workdir={tmp_path}/w")
    assert run_out.returncode == 2 and "merge.method" in run_out.stderr
    assert not (tmp_path / "w").exists(), "nothing ran"


def test_the_one_stage_job_entry_runs_any_stage_of_either_method(tmp_path):
    """`python -m jobs.stage STAGE --config …` is `fusion-ray run … --stages STAGE`: it takes an
    implicit stage as well as an explicit one, passes overrides and --force on, and a stage the
    config's method does not have fails before any work, naming it."""
    from jobs.stage import stage_argv

    assert stage_argv(["dpo", "--config", "c.yaml", "implicit.dpo.beta=0.1", "--force"]) == [
        "run", "c.yaml", "--stages", "dpo", "implicit.dpo.beta=0.1", "--force"]
    assert stage_argv(["train", "--config", "c.yaml"]) == ["run", "c.yaml", "--stages", "train"]

    def job(*args):
        return subprocess.run([sys.executable, "-m", "jobs.stage", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    wrong = job("dpo", "--config", "jobs/configs/tiny_cpu.yaml", f"workdir={tmp_path}/w")
    assert wrong.returncode != 0 and "dpo" in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr
    unknown = job("colect", "--config", "jobs/configs/tiny_cpu.yaml")
    assert unknown.returncode == 2 and "colect" in unknown.stderr
    assert not (tmp_path / "w").exists(), "nothing ran"
