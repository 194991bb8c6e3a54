"""The `reward` stage (implicit fusion): every sampled response → a reward and, where the prompt is
verifiable, a verdict → `rewards/part-*.parquet`.

Shard k of `rewards/` holds the samples of prompt shard k from every source, in (source, prompt,
sample) order, one row each: prompt_id, domain, verify, verifiable, source, sample_index,
response, tokens, finish_reason, reward, correct (True/False for verifiable prompts, None for
open ones) and verdict (the verifier's reason: "passed", "wrong_answer", "no_answer",
"timeout", "memory", "error", …; "" for open prompts).

Ray Data streams every source's sample shards through a pool of scorer actors
(`RewardUDF`: `implicit.reward.concurrency` actors of its CPUs / GPUs). Each actor checks
math answers (`verify.math_correct`) and judges code against its tests (`verify.verify_code`:
under bubblewrap, the verdict reached outside the candidate's sandbox, within `implicit.sandbox`
limits; hostile code fails its sample and the stage carries on; where bubblewrap cannot run, the
stage refuses to start, in one line), and scores the chat with the reward model
(`engines/reward_model.py`). Without a reward model (verifiable corpora only) the reward is 1
for a correct response, 0 otherwise. Responses that never started (`prompt_too_long`) get no row;
the manifest counts them. As in `collect`, a shard is written atomically once all its rows are in
(the first copy of each kept), and a rerun scores only missing shards.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

from fusion_ray import io, locations
from fusion_ray.config import FusionConfig
from fusion_ray.contract import StageResult
from fusion_ray.errors import InputError
from fusion_ray.schema import PROMPTS_DIR, REWARDS
from fusion_ray.shards import columns_key, map_shards

UNSCORED = ("prompt_too_long",)


def sandbox_limits(cfg: FusionConfig):
    from fusion_ray.reward.sandbox import SandboxLimits

    s = cfg.implicit.sandbox
    return SandboxLimits(cpu_seconds=s.cpu_seconds, wall_seconds=s.wall_seconds, memory_bytes=s.memory_mb << 20,
                         file_bytes=s.file_mb << 20, output_bytes=s.output_kb << 10, processes=s.processes)


def sandbox_settings(cfg: FusionConfig):
    from fusion_ray.reward.sandbox import SandboxSettings

    s = cfg.implicit.sandbox
    return SandboxSettings(uid=s.uid, python=s.python, packages=tuple(s.packages))


def sandbox_problem(cfg: FusionConfig) -> str | None:
    """Why code prompts cannot be verified here (one line), or None: bubblewrap must run a Python
    sandbox unless the config chose the unsafe in-process guard."""
    if cfg.implicit is None or not any(c.verify == "code" for c in cfg.implicit.prompts):
        return None
    if cfg.implicit.sandbox.isolation != "bwrap":
        return None
    from fusion_ray.reward.sandbox import available

    why = available(sandbox_settings(cfg))
    if why is None:
        return None
    return (f"implicit.sandbox: code prompts are verified under bubblewrap, which cannot run here: {why}; "
            "install the Debian package bubblewrap (make setup does), or set "
            "implicit.sandbox.isolation=unsafe-in-process (tests only: a hostile candidate can fool it)")


def check(prompt: dict, response: str, limits, isolation: str = "bwrap", settings=None) -> tuple[bool | None, str]:
    """(correct, verdict) of one response: None and "" for an open prompt."""
    from fusion_ray.reward import verify

    if prompt["verify"] == "math":
        if verify.extract_answer(response) is None:
            return False, "no_answer"
        ok = verify.math_correct(response, prompt["answer"])
        return ok, "passed" if ok else "wrong_answer"
    if prompt["verify"] == "code":
        verdict = verify.verify_code(response, prompt["tests"], limits, isolation=isolation,
                                     settings=settings or verify.SandboxSettings())
        return verdict.passed, verdict.reason
    return None, ""


class RewardUDF:
    """Ray Data callable class: sample rows in, scored rows out (verifiers, then the reward model)."""

    def __init__(self, cfg: dict, prompt_files: list[str]):
        self.cfg = FusionConfig.from_wire(cfg)
        self.limits, self.settings = sandbox_limits(self.cfg), sandbox_settings(self.cfg)
        self.isolation = self.cfg.implicit.sandbox.isolation
        why = sandbox_problem(self.cfg)  # on this node: the driver checked its own
        if why is not None:
            raise InputError(why)
        table = pa.concat_tables([io.read_table(f) for f in prompt_files])
        self.prompts = {r["prompt_id"]: r for r in table.to_pylist()}
        self.scorer = None
        spec = self.cfg.implicit.reward
        if spec is not None:
            from fusion_ray.engines.reward_model import RewardScorer

            self.scorer = RewardScorer(locations.local_dir(spec.path, revision=spec.revision), dtype=spec.dtype,
                                       trust_remote_code=spec.trust_remote_code, max_length=spec.max_length,
                                       batch_size=spec.batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [r for r in batch.to_pylist() if r["finish_reason"] not in UNSCORED]
        out = []
        for r in rows:
            prompt = self.prompts[r["prompt_id"]]
            correct, verdict = check(prompt, r["response"], self.limits, self.isolation, self.settings)
            out.append({"prompt_id": r["prompt_id"], "domain": prompt["domain"], "verify": prompt["verify"],
                        "verifiable": prompt["verify"] != "none", "source": r["source"],
                        "sample_index": r["sample_index"], "response": r["response"], "tokens": r["tokens"],
                        "finish_reason": r["finish_reason"], "reward": float(bool(correct)), "correct": correct,
                        "verdict": verdict, "path": r["path"]})
        if self.scorer is not None and out:
            chats = [json.loads(self.prompts[o["prompt_id"]]["messages"]) + [{"role": "assistant",
                                                                             "content": o["response"]}] for o in out]
            for o, score in zip(out, self.scorer.score(chats), strict=True):
                o["reward"] = score
        paths = [o.pop("path") for o in out]
        return pa.Table.from_pylist(out, schema=REWARDS).append_column("path", pa.array(paths, pa.string()))


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    """Score every source's samples (verifiers, then the reward model), one output shard per prompt shard."""

    from fusion_ray.placement import engine_placement, ray_data_args
    from fusion_ray.ray_env import init_ray

    if cfg.implicit is None:
        raise ValueError("the reward stage needs the `implicit` section (method: implicit)")
    why = sandbox_problem(cfg)
    if why is not None:
        raise InputError(why)
    prompts_dir = f"{cfg.stage_dir('sample')}/{PROMPTS_DIR}"
    prompts = io.finished(prompts_dir, "sample")
    inputs = {"prompts": prompts["fingerprint"]}
    for s in cfg.sources:
        inputs[s.name] = io.finished(cfg.stage_dir("sample", s.name), "sample")["fingerprint"]
    spec = cfg.implicit.reward
    settings = {"reward": None if spec is None else spec.model_dump(mode="json", exclude={"concurrency"}),
                "sandbox": cfg.implicit.sandbox.model_dump(mode="json")}
    fp = io.fingerprint("reward", settings, None if spec is None else
                        locations.fingerprint(spec.path, revision=spec.revision), inputs)
    out_dir = cfg.stage_dir("reward")
    started = time.monotonic()
    out = io.begin(out_dir, fp, force)
    if out is None:
        return StageResult.skipped(out_dir)
    prompt_files = io.list_files(prompts_dir)
    names = [Path(f).name for f in prompt_files]
    todo = [n for n in names if not out.has(n)]
    sample_files = {n: [f"{cfg.stage_dir('sample', s.name)}/{n}" for s in cfg.sources] for n in todo}
    expected: dict[str, list[tuple]] = {}
    skipped: Counter = Counter()
    for n in todo:
        keys = []
        for f in sample_files[n]:
            t = io.read_table(f, columns=["source", "prompt_id", "sample_index", "finish_reason"])
            for src, pid, idx, why in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
                if why in UNSCORED:
                    skipped[why] += 1
                else:
                    keys.append((src, pid, idx))
        expected[n] = keys
    files = [f for n in todo if expected[n] for f in sample_files[n]]
    if files:
        init_ray(cfg.ray)
    scorer = engine_placement(tensor_parallel=1, pipeline_parallel=1, gpus=spec.num_gpus_per_actor if spec else 0,
                              cpus=spec.num_cpus_per_actor if spec else 1, accelerator_type=None)
    map_shards(files, expected, out, RewardUDF, udf_kwargs={"cfg": cfg.to_wire(), "prompt_files": prompt_files},
               keys=columns_key("source", "prompt_id", "sample_index"), batch_size=spec.batch_size if spec else 16,
               concurrency=spec.concurrency if spec else 1, resources=ray_data_args(scorer),
               name="reward", what="reward", empty=REWARDS)
    table = pa.concat_tables([io.read_table(out.path(n), columns=["source", "domain", "reward", "verifiable",
                                                                  "correct", "verdict"]) for n in names])
    summary = summarize(table)
    out.commit(io.Manifest(stage="reward", fingerprint=fp, config_hash=cfg.config_hash(),
                           rows={"in": table.num_rows + sum(skipped.values()), "out": table.num_rows},
                           inputs=inputs, wall_time_s=time.monotonic() - started,
                           extra={**summary, "unscored": dict(skipped)}), config=cfg.to_dict())
    from fusion_ray.progress import rate

    log(f"[reward] {rate(table.num_rows, time.monotonic() - started, 'responses')}; "
        + "; ".join(f"{src}: mean reward {v['mean_reward']:.4g}" + (f", {v['correct']}/{v['verifiable']} correct"
                                                                     if v["verifiable"] else "")
                    for src, v in summary["per_source"].items()))
    return StageResult("done", [out.final], {"rows": table.num_rows, **summary})


def summarize(table: pa.Table) -> dict:
    """Per source and per domain: responses, mean reward, verifiable and correct counts, verdicts."""
    def tally(rows):
        verifiable = [r for r in rows if r["verifiable"]]
        return {"responses": len(rows), "mean_reward": sum(r["reward"] for r in rows) / max(len(rows), 1),
                "verifiable": len(verifiable), "correct": sum(bool(r["correct"]) for r in verifiable),
                "verdicts": dict(Counter(r["verdict"] for r in verifiable))}

    rows = table.select(["source", "domain", "reward", "verifiable", "correct", "verdict"]).to_pylist()
    by = lambda key: {k: tally([r for r in rows if r[key] == k]) for k in sorted({r[key] for r in rows})}  # noqa: E731
    return {"per_source": by("source"), "per_domain": by("domain")}


