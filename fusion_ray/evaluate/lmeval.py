"""lm-evaluation-harness tasks (`eval.lm_eval`) against arms' model dirs and/or a chat endpoint.

`run_lm_eval(spec, arms)` runs every task of `spec.tasks` once per target: each arm named in
`spec.arms` through lm-eval's `hf` model (its dir loaded in float32 on CPU), and
`spec.endpoint` (target name `endpoint`) through lm-eval's `local-chat-completions` model, which
sends `/chat/completions` requests and so runs `generate_until` tasks only. Each target is one
Ray task (`spec.num_cpus` each, and `spec.num_gpus` for a model dir: on a GPU it runs there in the
checkpoint's dtype), so a cluster evaluates arms in parallel.

Offline by design: each Ray task starts with HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set, so a
task's data must be local (`dataset_path: json` with `data_files`, for instance); relative
`data_files` resolve against `spec.include_path` (lm-eval runs from there). A hub-id arm must
already be in this node's HF cache (the earlier stages put it there).

Task names are checked in the driver, before any model is loaded or request sent: an unknown
name is an error naming it and the include_path. The endpoint's key is read from the env var
named by `endpoint.api_key_env` in the driver and goes to lm-eval as a request header, never
into the model arguments that lm-eval echoes back in its results.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusion_ray.config import LmEvalConfig

ENDPOINT = "endpoint"  # the target name of `spec.endpoint`
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics (lm-eval's default 100 000 takes minutes)


class LmEvalError(ValueError):
    """An `eval.lm_eval` setting that cannot run: named in one line, raised before any model loads."""


def version() -> str:
    from importlib.metadata import version as dist_version

    return dist_version("lm_eval")


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise LmEvalError("eval.lm_eval needs lm-evaluation-harness: pip install 'fusion-ray[lmeval]' "
                          f"({err})") from err
    return lm_eval


def include_dir(spec: LmEvalConfig) -> str | None:
    """The include_path as a local dir on this node (a store URI is copied once)."""
    if spec.include_path is None:
        return None
    from fusion_ray import locations

    try:
        path = locations.local_dir(spec.include_path)
    except locations.LocationError as err:
        raise LmEvalError(f"eval.lm_eval.include_path: {err}") from err
    if not Path(path).is_dir():
        raise LmEvalError(f"eval.lm_eval.include_path: not a directory of task YAMLs: {spec.include_path}")
    return os.path.abspath(path)


def task_manager(include: str | None, tasks: list[str]):
    """lm-eval's TaskManager that knows `tasks`: the include_path's own tasks only when they are all
    there (indexing lm-eval's ~230 built-in task dirs costs seconds), else built-ins as well."""
    from lm_eval.tasks import TaskManager

    if include is not None:
        own = TaskManager(include_path=include, include_defaults=False)
        if not _unknown(own, tasks):
            return own
    return TaskManager(include_path=include)


def _unknown(manager, tasks: list[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known]


def check_tasks(spec: LmEvalConfig) -> str | None:
    """Every task name of `spec` exists (in the include_path or lm-eval's own); the local include dir."""
    _import_lm_eval()
    include = include_dir(spec)
    unknown = _unknown(task_manager(include, spec.tasks), spec.tasks)
    if unknown:
        where = f"include_path {spec.include_path}" if spec.include_path else "no include_path set"
        raise LmEvalError(f"eval.lm_eval.tasks: unknown task(s) {', '.join(unknown)} (not in lm-eval's "
                          f"tasks nor the include_path; {where})")
    return include


def pick_arms(spec: LmEvalConfig, arms: Mapping[str, str]) -> dict[str, str]:
    """arm → model dir of the arms `spec.arms` names (a name ending in ':' picks every arm it prefixes)."""
    from fusion_ray.evaluate.selection import pick

    try:
        return pick(spec.arms, dict(arms), [], "eval.lm_eval.arms")
    except ValueError as err:
        raise LmEvalError(str(err)) from None


def endpoint_key(spec: LmEvalConfig) -> str | None:
    env = spec.endpoint.api_key_env if spec.endpoint else None
    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise LmEvalError(f"eval.lm_eval.endpoint.api_key_env: the env var {env} is not set")
    return key


def settings(spec: LmEvalConfig) -> dict:
    """What a report records of the run (the endpoint's URL and model, never its key)."""
    out = spec.model_dump(mode="json")
    out["bootstrap_iters"] = BOOTSTRAP_ITERS
    out["offline"] = True
    return out


def run_lm_eval(spec: LmEvalConfig, arms: Mapping[str, str], log=print, *,
                trust_remote_code: Mapping[str, bool] | None = None) -> dict:
    """Run `spec.tasks` on each chosen arm's model dir and on `spec.endpoint`.

    `arms`: arm → model dir of this run (the eval stage's arms); `trust_remote_code`: arm → the
    flag of the model it came from (default off). Returns {"lm_eval_version", "settings",
    "results": {target: {task: {metric: value, metric_stderr: value, "n": items}}},
    "samples": {target: {task: [per-item prompt, target, response, filtered response, metrics]}}}.
    """
    import ray

    check_tasks(spec)  # before any model loads: unknown names fail here
    chosen = pick_arms(spec, arms)
    key = endpoint_key(spec)
    flags = dict(trust_remote_code or {})
    common = dict(tasks=list(spec.tasks), include_path=spec.include_path, limit=spec.limit,
                  num_fewshot=spec.num_fewshot, batch_size=spec.batch_size)
    task = ray.remote(evaluate_target).options(num_cpus=spec.num_cpus, max_retries=1,
                                               runtime_env={"env_vars": dict(OFFLINE_ENV)})
    on_gpu = task.options(num_gpus=spec.num_gpus) if spec.num_gpus else task  # model dirs; the endpoint needs none
    refs = {arm: on_gpu.remote({"kind": "hf", "path": path, "trust_remote_code": bool(flags.get(arm, False)),
                              "apply_chat_template": spec.apply_chat_template}, common)
            for arm, path in chosen.items()}
    if spec.endpoint is not None:
        ep = spec.endpoint
        refs[ENDPOINT] = task.remote({"kind": "endpoint", "url": ep.url.rstrip("/"), "model": ep.model,
                                      "key": key}, common)
    results, samples = {}, {}
    for target, ref in refs.items():
        results[target], samples[target] = ray.get(ref)
        for name, metrics in results[target].items():
            shown = "  ".join(f"{m} {v:.4f}" for m, v in metrics.items()
                              if isinstance(v, float) and not m.endswith("_stderr"))
            log(f"[eval] lm-eval {target:<20} {name}: {shown}")
    return {"lm_eval_version": version(), "settings": settings(spec), "results": results, "samples": samples}


def evaluate_target(target: dict, common: dict) -> tuple[dict, dict]:
    """One target's lm-eval run (a Ray task): {task: metrics}, {task: per-item records}."""
    import torch

    _import_lm_eval()
    import lm_eval

    from fusion_ray import locations

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    include = None
    if common["include_path"] is not None:
        include = os.path.abspath(locations.local_dir(common["include_path"]))
    manager = task_manager(include, common["tasks"])
    if target["kind"] == "hf":
        path = os.path.abspath(locations.local_dir(target["path"]))
        model: Any = "hf"
        gpu = torch.cuda.is_available()  # the task asked eval.lm_eval.num_gpus: its GPU, the checkpoint's dtype
        model_args: dict | None = {"pretrained": path, "dtype": "auto" if gpu else "float32",
                                   "device": "cuda" if gpu else "cpu",
                                   "trust_remote_code": target["trust_remote_code"]}
        chat = target["apply_chat_template"]
    else:
        model = _endpoint_model(target, common["batch_size"])
        model_args = None
        chat = True  # a chat endpoint templates every request itself: lm-eval must send messages
    cwd = os.getcwd()
    if include is not None:
        os.chdir(include)  # relative `data_files` of the include_path's YAMLs resolve against it
    try:
        tasks = manager.load(common["tasks"])["tasks"] if target["kind"] == "endpoint" else None
        if tasks is not None:
            wrong = [n for n, t in tasks.items() if getattr(t, "OUTPUT_TYPE", None) != "generate_until"]
            if wrong:
                raise LmEvalError(f"eval.lm_eval.endpoint: a chat endpoint runs generate_until tasks only; "
                                  f"not {', '.join(sorted(wrong))}")
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=common["tasks"],
                                      task_manager=manager, num_fewshot=common["num_fewshot"],
                                      batch_size=common["batch_size"], limit=common["limit"],
                                      apply_chat_template=chat, log_samples=True,
                                      bootstrap_iters=BOOTSTRAP_ITERS)
    finally:
        os.chdir(cwd)
    return metrics_of(out["results"], out["n-samples"]), {n: [_sample(s) for s in rows]
                                                           for n, rows in out["samples"].items()}


def _endpoint_model(target: dict, concurrency: int):
    """lm-eval's `local-chat-completions` LM, built here so the key travels in a header only."""
    from lm_eval.api.registry import get_model

    header = {"Authorization": f"Bearer {target['key']}"} if target["key"] else None
    return get_model("local-chat-completions")(
        model=target["model"], base_url=target["url"] + "/chat/completions", tokenizer_backend=None,
        tokenized_requests=False, num_concurrent=concurrency, header=header)


def metrics_of(results: dict, counts: dict) -> dict[str, dict[str, Any]]:
    """lm-eval's {task: {"metric,filter": v}} as {task: {metric: v, metric_stderr: v, "n": items}}.

    The filter name is dropped where a task has one filter per metric (`exact_match`, not
    `exact_match,first_word`), kept as `metric,filter` where several filters score one metric."""
    out: dict[str, dict[str, Any]] = {}
    for task, row in results.items():
        keys = [k for k in row if "," in k]
        per_metric: dict[str, int] = {}
        for k in keys:
            if "_stderr," not in k:
                per_metric[k.split(",")[0]] = per_metric.get(k.split(",")[0], 0) + 1
        metrics: dict[str, Any] = {}
        for k in keys:
            name, filt = k.split(",", 1)
            base = name.removesuffix("_stderr")
            label = base if per_metric.get(base, 0) <= 1 else f"{base},{filt}"
            value = row[k]
            value = float(value) if isinstance(value, int | float) else None  # "N/A" stderr → None
            metrics[label + ("_stderr" if name.endswith("_stderr") else "")] = value
        n = counts.get(task, {})
        if isinstance(n, dict) and "effective" in n:
            metrics["n"] = int(n["effective"])
        out[task] = metrics
    return out


def _sample(s: dict) -> dict:
    """One item's record, for audit: its prompt, target, raw and filtered responses, metrics."""
    args = s.get("arguments") or []
    prompt = args[0][0] if args and isinstance(args[0], list | tuple) and args[0] else None
    resps = s.get("resps") or []
    raw = [r[0] if isinstance(r, list | tuple) and r else r for r in resps]
    return {"doc_id": s.get("doc_id"), "filter": s.get("filter"), "prompt": _plain(prompt),
            "target": _plain(s.get("target")), "responses": _plain(raw),
            "filtered": _plain(s.get("filtered_resps")),
            **{m: _plain(s.get(m)) for m in s.get("metrics", [])}}


def _plain(v: Any) -> Any:
    """JSON-able (lm-eval's records hold numpy scalars and tuples)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v if v is None or isinstance(v, str | int | float | bool) else str(v)
