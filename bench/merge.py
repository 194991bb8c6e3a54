"""Benchmark the merge engine against mergekit 0.1.5 on a ~150M-parameter Llama in bfloat16.

Builds (once, cached in --workdir) a random Llama base (hidden 768, 12 layers, vocab 32000,
untied head: 148M parameters, bf16, 3 safetensors shards) and 3 fine-tunes (base + Gaussian
deltas of 0.1 × each tensor's std); installs mergekit==0.1.5 in its OWN throwaway venv
(--mergekit-venv; not a project dependency); then, for linear, ties, sce and dare_ties, runs
`mergekit-yaml` and `fusion-ray merge` on the SAME YAML (dtype bfloat16), each in a fresh
process, alternating, --repeat times, and reports the best wall time, the peak RSS (wait4)
and the max abs difference of every output tensor. DARE masks cannot match mergekit's (it draws from one global RNG in
execution order; ours are seeded per tensor), so dare_ties also gets a statistical check.
ties and sce are rerun with `selection: sort` (mergekit's torch sort, for bit parity).

Usage: python bench/merge.py [--workdir DIR] [--mergekit-venv DIR] [--no-parity] [--methods a,b] [--repeat N]
The last line is one JSON object: method → {"speedup", "rss_ratio", "max_abs_diff"}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

METHODS = {
    "linear": {"per_model": [{"weight": 0.25}] * 3, "base_weight": 0.25},
    "ties": {"per_model": [{"weight": w, "density": 0.5} for w in (0.4, 0.3, 0.3)]},
    "sce": {"parameters": {"select_topk": 0.1}},
    "dare_ties": {"per_model": [{"weight": w, "density": 0.5} for w in (0.4, 0.3, 0.3)]},
}


def build_models(root: Path) -> list[Path]:
    """Base + 3 fine-tunes as bf16 HF dirs (cached)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dirs = [root / n for n in ("base", "ft0", "ft1", "ft2")]
    if all((d / "model.safetensors.index.json").exists() for d in dirs):
        return dirs
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2560, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(dirs[0], max_shard_size="100MB")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, d in enumerate(dirs[1:]):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                b = base[name].float()
                p.copy_((b + torch.randn(p.shape, generator=g) * 0.1 * b.std().clamp(min=1e-3)).bfloat16())
        model.save_pretrained(d, max_shard_size="100MB")
    return dirs


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run(pip + ["mergekit==0.1.5"], check=True)
    return exe


def write_yaml(path: Path, method: str, dirs: list[Path], extra: dict | None = None) -> Path:
    m = METHODS[method]
    base, fts = dirs[0], dirs[1:]
    per = m.get("per_model", [None] * 3)
    models = [{"model": str(f), **({"parameters": p} if p else {})} for f, p in zip(fts, per, strict=True)]
    cfg: dict = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method == "linear":
        cfg["models"].insert(0, {"model": str(base), "parameters": {"weight": m["base_weight"]}})
    else:
        cfg["base_model"] = str(base)
    if "parameters" in m:
        cfg["parameters"] = m["parameters"]
    path.write_text(yaml.safe_dump({**cfg, **(extra or {})}, sort_keys=False))
    return path


def best_of(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The fastest wall time and the largest peak RSS over repeated runs."""
    return min(r[0] for r in runs), max(r[1] for r in runs)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def tensors(d: Path):
    from safetensors import safe_open

    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                yield k, h, f


def compare(a: Path, b: Path, base: Path | None = None) -> dict:
    """Per-tensor max abs difference (float32), plus DARE statistics against the base."""
    from safetensors import safe_open

    where_b = {k: f for k, _, f in tensors(b)}
    where_base = {k: f for k, _, f in tensors(base)} if base else {}
    diffs, n_diff, n_all, kept = {}, 0, 0, [0, 0]
    for k, h, _ in tensors(a):
        x = h.get_tensor(k).float()
        with safe_open(str(where_b[k]), "pt") as hb:
            y = hb.get_tensor(k).float()
        diffs[k] = (x - y).abs().max().item()
        n_diff += int((x != y).sum())
        n_all += x.numel()
        if base:
            with safe_open(str(where_base[k]), "pt") as hz:
                z = hz.get_tensor(k).float()
            kept[0] += int((x == z).sum())
            kept[1] += int((y == z).sum())
    out = {"max_abs_diff": max(diffs.values()), "tensors": len(diffs),
           "tensors_differing": sum(v > 0 for v in diffs.values()), "elements_differing": n_diff,
           "elements": n_all, "per_tensor": diffs}
    if base:
        out["equal_to_base"] = {"mergekit": kept[0] / n_all, "ours": kept[1] / n_all}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/fusion_ray_bench_merge")
    ap.add_argument("--mergekit-venv", default=None)
    ap.add_argument("--no-parity", action="store_true", help="skip the `selection: sort` reruns")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--repeat", type=int, default=2, help="runs per tool and method (best wall time kept)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dirs = build_models(work / "models")
    mk = ensure_mergekit(Path(args.mergekit_venv or work / "mergekit-venv"))
    print(f"models: base + 3 fine-tunes, 148M params bf16 ({time.perf_counter() - started:.0f}s to build/check)")
    ours = [sys.executable, "-m", "fusion_ray.cli", "merge"]
    summary, details = {}, {}
    for method in args.methods.split(","):
        cfg = write_yaml(work / f"{method}.yaml", method, dirs)
        mk_runs, our_runs = [], []
        for _ in range(args.repeat):  # alternate the tools: a shared machine's load hits both alike
            mk_runs.append(timed([str(mk), str(cfg), str(work / f"mk_{method}"), "--random-seed", "0", "--quiet"]))
            our_runs.append(timed(ours + [str(cfg), str(work / f"ours_{method}"), "--force", "--seed", "0"]))
        (t_mk, rss_mk), (t_us, rss_us) = best_of(mk_runs), best_of(our_runs)
        cmp = compare(work / f"mk_{method}", work / f"ours_{method}", dirs[0] if method.startswith("dare") else None)
        details[method] = cmp
        summary[method] = {"speedup": round(t_mk / t_us, 2), "rss_ratio": round(rss_us / rss_mk, 2),
                           "max_abs_diff": cmp["max_abs_diff"]}
        print(f"{method:10s} mergekit {t_mk:6.1f}s {rss_mk:6.0f} MiB | fusion_ray {t_us:6.1f}s {rss_us:6.0f} MiB | "
              f"speedup {t_mk / t_us:.2f}x rss {rss_us / rss_mk:.2f} | max|Δ| {cmp['max_abs_diff']:.3g} "
              f"({cmp['tensors_differing']}/{cmp['tensors']} tensors, "
              f"{cmp['elements_differing'] / cmp['elements']:.2%} of elements differ)")
        if "equal_to_base" in cmp:
            e = cmp["equal_to_base"]
            print(f"{'':10s} DARE check: elements left at the base value: mergekit {e['mergekit']:.2%}, "
                  f"fusion_ray {e['ours']:.2%}")
        if method in ("ties", "sce") and not args.no_parity:
            cfg = write_yaml(work / f"{method}_sort.yaml", method, dirs, {"selection": "sort"})
            t_s, rss_s = timed(ours + [str(cfg), str(work / f"ours_{method}_sort"), "--force"])
            exact = compare(work / f"mk_{method}", work / f"ours_{method}_sort")
            details[f"{method}_sort"] = exact
            print(f"{'':10s} selection: sort (mergekit's tie order): {t_s:6.1f}s {rss_s:6.0f} MiB, "
                  f"speedup {t_mk / t_s:.2f}x, max|Δ| {exact['max_abs_diff']:.3g}")
    (work / "merge_bench.json").write_text(json.dumps(details, indent=1))
    print(f"per-tensor differences: {work / 'merge_bench.json'}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
