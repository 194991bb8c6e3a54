"""Heavy imports stay lazy: `import fusion_ray` (and its pure modules) load no engine."""

import json
import subprocess
import sys

HEAVY = ["vllm", "deepspeed", "ray", "ray.serve", "transformers", "torch"]


def _loaded_after(code: str) -> dict:
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_fusion_ray_loads_no_engine():
    loaded = _loaded_after("import fusion_ray")
    assert not any(loaded.values()), loaded


def test_pure_modules_load_no_engine():
    loaded = _loaded_after(
        "import fusion_ray.config, fusion_ray.io, fusion_ray.schema, fusion_ray.pipeline, "
        "fusion_ray.cli, fusion_ray.demo.assets"
    )
    assert not any(loaded.values()), loaded


def test_the_probe_can_see_a_heavy_import():
    assert _loaded_after("import fusion_ray.ray_env, ray")["ray"]
