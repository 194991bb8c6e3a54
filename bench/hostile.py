"""Benchmark the endpoint under abuse: large requests must not stall or bloat it.

One `fusion-ray serve` server on the demo's pivot (and, side by side, vLLM's own OpenAI server on
the same model as the reference, where vLLM is installed) gets, over `--seconds`:
  - `--abusers` clients each sending chat requests whose message is `--large-mb` MB, one after
    another (the server must answer each with a 4xx, fast);
  - one client polling `GET /health` every 50 ms (its latency while the large requests arrive);
  - one client sending normal chat completions (each must succeed).
The replica's (and Serve proxy's) resident memory is read before and after (`psutil`).

With `--baseline-checkout DIR` (e.g. a `git worktree` of an earlier commit) the same server
from that checkout is measured too, side by side (its `baseline_*` figures).

Usage: python bench/hostile.py [--engine hf|vllm] [--seconds 20] [--large-mb 20] [--abusers 2]
       [--baseline-checkout DIR] [--no-reference]
The last line is one JSON object: health_latency_ms_during_large_request (p99; goal ≤ 1000),
large_request_reject_ms (p50 of the time until the answer's status line arrives, the client
reading while it writes; goal ≤ 100), rss_growth_mb_after_large_requests (goal ≤ 50),
normal_request_success_during_abuse (goal 1.0), and the same figures of the reference server.
"""

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from serve import engine_leftovers, free_port, start, stop, wait_ready  # noqa: E402  (bench/serve.py)


def server_processes(root: psutil.Process, reference: bool) -> list[psutil.Process]:
    """The processes whose memory counts: the Serve replica and proxy (Ray workers, found by
    their titles), or the reference server's process tree."""
    if reference:
        return [root, *root.children(recursive=True)]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if "ServeReplica:fused_chat" in title or "ProxyActor" in title:
            found.append(proc)
    return found


def rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def large_body(model: str, megabytes: float) -> bytes:
    text = ("lorem ipsum dolor sit amet " * (int(megabytes * 2**20) // 27 + 1))[: int(megabytes * 2**20)]
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}],
                       "max_tokens": 4}).encode()


async def send_large(base: str, body: bytes) -> tuple[int | str, float, float]:
    """POST `body` as a client that reads while it writes (as curl does): (status, seconds until the
    status line arrived, seconds until the exchange ended). A server that refuses by the declared
    length answers before the upload ends; one that parses first, only after it."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()

    async def upload() -> None:
        writer.write(head)
        for k in range(0, len(body), 2**20):
            writer.write(body[k:k + 2**20])
            await writer.drain()

    t0 = time.perf_counter()
    sending = asyncio.create_task(upload())
    try:
        line = await asyncio.wait_for(reader.readline(), 300)
        answered = time.perf_counter() - t0
        await asyncio.wait_for(reader.read(), 300)  # the rest of the answer, to the server's close
        parts = line.split()
        status: int | str = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else "no answer"
    except (OSError, asyncio.TimeoutError) as err:
        answered, status = time.perf_counter() - t0, type(err).__name__
    try:
        await sending
    except OSError:
        pass  # the server closed before the whole body was sent
    writer.close()
    return status, answered, time.perf_counter() - t0


async def abuse(base: str, model: str, args) -> dict:
    body = large_body(model, args.large_mb)
    stop_at = time.monotonic() + args.seconds
    rejects, exchanges, statuses, health, normal = [], [], {}, [], {"ok": 0, "failed": 0}

    async def abuser(_: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            status, answered, whole = await send_large(base, body)
            rejects.append(answered)
            exchanges.append(whole)
            statuses[status] = statuses.get(status, 0) + 1

    async def poller(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                ok = (await http.get(f"{base}/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            health.append((time.perf_counter() - t0) if ok else float("inf"))
            await asyncio.sleep(0.05)

    async def chatter(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            msg = {"model": model, "messages": [{"role": "user", "content": "What is a compiler?"}],
                   "max_tokens": 8, "temperature": 0}
            try:
                good = (await http.post(f"{base}/v1/chat/completions", json=msg)).status_code == 200
            except httpx.HTTPError:
                good = False
            normal["ok" if good else "failed"] += 1

    async with httpx.AsyncClient(timeout=120) as big, httpx.AsyncClient(timeout=120) as small:
        await asyncio.gather(*(abuser(big) for _ in range(args.abusers)), poller(small), chatter(small))
    cuts = statistics.quantiles(health, n=100) if len(health) > 1 else [health[0]] * 99
    return {"health_latency_ms_during_large_request": round(cuts[98] * 1000, 1),
            "large_request_reject_ms": round(statistics.median(rejects) * 1000, 1) if rejects else None,
            "large_request_exchange_ms": round(statistics.median(exchanges) * 1000, 1) if exchanges else None,
            "large_requests": len(rejects), "large_request_statuses": statuses,
            "normal_request_success_during_abuse": round(normal["ok"] / max(1, sum(normal.values())), 3),
            "normal_requests": sum(normal.values())}


def bench_server(kind: str, model: str, args, log_dir: Path, label: str | None = None) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    old_path, cwd = os.environ.get("PYTHONPATH"), None
    if label == "baseline":  # the server and its Ray workers (which put the driver's working dir
        cwd = str(Path(args.baseline_checkout).resolve())  # first on their path) import that checkout
        os.environ["PYTHONPATH"] = cwd
    try:
        ours = kind in ("hf", "vllm") and label is None
        extra = ("--max-request-bytes", str(args.max_request_bytes)) if ours and args.max_request_bytes else ()
        proc = start(kind, model, port, log_dir, extra, cwd=cwd)
    finally:
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
    kind = label or kind
    try:
        print(f"{kind:9s} ready in {wait_ready(base, proc):.0f}s", flush=True)
        name = Path(model).name
        asyncio.run(abuse(base, name, argparse.Namespace(**{**vars(args), "seconds": 2, "abusers": 0})))  # warm-up
        procs = server_processes(psutil.Process(proc.pid), reference=kind == "raw_vllm")
        before = {p.pid: rss_mb([p]) for p in procs}
        res = asyncio.run(abuse(base, name, args))
        time.sleep(2)
        after = {p.pid: rss_mb([p]) for p in procs}
        print("  RSS MB per process (before → after): " + ", ".join(
            f"{' '.join(p.cmdline())[:40]} {before[p.pid]:.0f} → {after[p.pid]:.0f}" for p in procs), flush=True)
        before = sum(before.values())
        res["rss_growth_mb_after_large_requests"] = round(sum(after.values()) - before, 1)
        res["rss_mb_before"] = round(before, 1)
    finally:
        stop(proc)
    print(f"{kind:9s} /health p99 {res['health_latency_ms_during_large_request']:7.1f} ms  large request answered "
          f"in {res['large_request_reject_ms']:6.1f} ms, exchange over in {res['large_request_exchange_ms']:.0f} ms "
          f"(p50 of {res['large_requests']}: {res['large_request_statuses']})"
          f"  RSS {res['rss_mb_before']:.0f} MB, +{res['rss_growth_mb_after_large_requests']:.1f} MB after  "
          f"normal requests ok {res['normal_request_success_during_abuse']:.0%} of {res['normal_requests']}",
          flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    has_vllm = importlib.util.find_spec("vllm") is not None
    parser.add_argument("--engine", choices=["hf", "vllm"], default="vllm" if has_vllm else "hf")
    parser.add_argument("--model", default="demo:pivot")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--large-mb", type=float, default=20)
    parser.add_argument("--abusers", type=int, default=2)
    parser.add_argument("--no-reference", action="store_true", help="skip vLLM's own server")
    parser.add_argument("--baseline-checkout", help="also measure the server of this checkout (side by side)")
    parser.add_argument("--max-request-bytes", type=int, default=None,
                        help="the servers' body limit (ablation: 1073741824 turns the bound off)")
    args = parser.parse_args()

    from fusion_ray import locations

    model = str(locations.local_dir(args.model))
    kinds = [args.engine] + (["raw_vllm"] if has_vllm and not args.no_reference else [])
    before = engine_leftovers()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as logs:
        try:
            results = {kind: bench_server(kind, model, args, Path(logs)) for kind in kinds}
            if args.baseline_checkout:
                results["baseline"] = bench_server(args.engine, model, args, Path(logs), label="baseline")
        finally:
            for leftover in engine_leftovers() - before:
                Path(leftover).unlink(missing_ok=True)
    ours = results[args.engine]
    keys = ("health_latency_ms_during_large_request", "large_request_reject_ms",
            "rss_growth_mb_after_large_requests", "normal_request_success_during_abuse")
    summary = {k: ours[k] for k in keys}
    summary.update({"engine": args.engine, "large_mb": args.large_mb, "seconds": args.seconds,
                    "large_request_statuses": ours["large_request_statuses"]})
    if "baseline" in results:
        summary.update({f"baseline_{k}": results["baseline"][k] for k in keys})
    if "raw_vllm" in results:
        summary.update({f"reference_vllm_{k}": results["raw_vllm"][k] for k in keys})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
