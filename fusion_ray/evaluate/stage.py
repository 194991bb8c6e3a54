"""The `eval` stage: held-out bits per byte of every arm, per domain, and the report.

Arms (names fixed, the report and its tests rely on them):
  `source:<name>`  each source model, with its own tokenizer and chat template;
  `pivot`          the pivot before training;
  `clm_only`       the pivot trained with λ = 1 (when `train.clm_only_arm`);
  `fused:<pair>`   each pairwise fused target;
  `merged`         the merged model (when the merge stage has run).
Bits per UTF-8 byte of the assistant replies is fair across tokenizers. Each arm is
scored by one Ray task (`eval.num_cpus` each), so a cluster scores arms in parallel.

Output `report/`: `report.json` (`bpb`, `source_domain`, `models`, plus the fuse stage's
routing, each stage's wall time and peak memory, and with `eval.chat` / `eval.lm_eval` the chat
answers' judge results and lm-eval's, see evaluate/chat.py),
`report.md` (tables) and `report.png` (bars per domain and arm).
"""

from __future__ import annotations

import os
import time

from fusion_ray import io, locations
from fusion_ray.config import FusionConfig
from fusion_ray.contract import StageResult


def arms(cfg: FusionConfig) -> dict[str, str]:
    """arm → model dir, for every arm whose model exists."""
    out = {f"source:{s.name}": s.path for s in cfg.sources}
    out["pivot"] = cfg.pivot.path
    if cfg.train.clm_only_arm and io.read_manifest(cfg.stage_dir("train", "clm_only")):
        out["clm_only"] = cfg.stage_dir("train", "clm_only")
    for _, pair in cfg.source_pairs():
        if io.read_manifest(cfg.stage_dir("train", pair)):
            out[f"fused:{pair}"] = cfg.stage_dir("train", pair)
    if io.read_manifest(cfg.stage_dir("merge")):
        out["merged"] = cfg.stage_dir("merge")
    from fusion_ray.checkpoint.adapter import dense_start  # LoRA targets (train.peft) are scored by their dense weights

    return {arm: path if arm == "pivot" or arm.startswith("source:") else dense_start(path)
            for arm, path in out.items()}


def heldout(cfg: FusionConfig) -> dict[str, list[list[dict]]]:
    """domain → conversations (message lists) of the held-out corpora."""
    from fusion_ray.chat_template import to_messages
    from fusion_ray.corpus import BadLine, iter_rows

    if not cfg.data.heldout:
        raise ValueError("eval needs held-out corpora: set data.heldout (each with a domain)")
    out: dict[str, list] = {}
    for spec in cfg.data.heldout:
        domain = spec.domain
        rows = out.setdefault(domain, [])
        for path, i, row in iter_rows(spec):
            if isinstance(row, BadLine):
                raise ValueError(f"{path} row {i}: {row.reason}")
            try:
                rows.append(to_messages(row, spec.format))
            except ValueError as err:
                raise ValueError(f"{path} row {i}: {err}") from err
            if cfg.eval.max_rows_per_domain and len(rows) >= cfg.eval.max_rows_per_domain:
                break
    return out


def score_model(path: str, conversations: dict[str, list], batch_size: int, max_length: int,
                trust_remote_code: bool = False) -> dict[str, float]:
    """Held-out bpb per domain of the model at `path` (its own tokenizer and template)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_ray import tokenizer as tokenizers
    from fusion_ray.evaluate.bpb import assistant_span, bits_per_byte, score_spans

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    path = locations.local_dir(path)  # on this task's node: a store or hub copy made once
    tokenizer = tokenizers.from_dir(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    out = {}
    for domain, convs in conversations.items():
        spans = [assistant_span(tokenizer, messages) for messages in convs]
        nll, n_bytes = score_spans(model, tokenizer, [t for t, _ in spans], [s for _, s in spans],
                                   batch_size=batch_size, max_length=max_length)
        out[domain] = bits_per_byte(nll, n_bytes)
    return out


def source_domains(cfg: FusionConfig) -> dict[str, str | None]:
    """source → the domain it specialises in (`sources[].domain`; None when not given)."""
    return {s.name: s.domain for s in cfg.sources}


def fingerprint(cfg: FusionConfig, models: dict[str, str]) -> str:
    """Eval settings, held-out data and each arm's identity (its stage fingerprint, else its files)."""
    def identity(path: str) -> str:
        manifest = io.read_manifest(path)
        return manifest["fingerprint"] if manifest else locations.fingerprint(path)

    return io.fingerprint("eval", cfg.to_dict()["eval"], [spec.model_dump() for spec in cfg.data.heldout],
                          {arm: identity(p) for arm, p in models.items()}, cfg.data.max_length)


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    if cfg.method == "implicit":  # accuracy, reward and win rate of the arms' answers (evaluate/implicit.py)
        from fusion_ray.evaluate import implicit

        return implicit.run(cfg, force, log)
    import ray

    from fusion_ray.evaluate.chat import chat_sections
    from fusion_ray.evaluate.report import stage_stats, write_report
    from fusion_ray.ray_env import init_ray

    models = arms(cfg)
    out_dir = cfg.stage_dir("eval")
    fp = fingerprint(cfg, models)
    started = time.monotonic()
    out = io.begin(out_dir, fp, force)
    if out is None:
        return StageResult.skipped(out_dir, report=f"{out_dir}/report.md")
    conversations = heldout(cfg)
    init_ray(cfg.ray)
    task = ray.remote(score_model).options(num_cpus=cfg.eval.num_cpus, max_retries=1)
    refs = {arm: task.remote(path, conversations, cfg.eval.batch_size, cfg.data.max_length,
                             cfg.pivot.trust_remote_code)
            for arm, path in models.items()}
    bpb = {arm: ray.get(ref) for arm, ref in refs.items()}
    for arm, values in bpb.items():
        log(f"[eval] {arm:<24} " + "  ".join(f"{d} {v:.4f}" for d, v in values.items()))
    routing = {pair: (io.read_manifest(cfg.stage_dir("fuse", pair)) or {}).get("extra", {}).get("routing")
               for _, pair in cfg.source_pairs()}
    report = {"bpb": bpb, "source_domain": source_domains(cfg), "models": models, "routing": routing,
              "stages": stage_stats(cfg), "config": cfg.name}
    report.update(chat_sections(cfg, models, out, log))
    write_report(report, out)
    out.commit(io.Manifest(stage="eval", fingerprint=fp, config_hash=cfg.config_hash(),
                           rows={d: len(c) for d, c in conversations.items()},
                           extra={"arms": sorted(models)}, wall_time_s=time.monotonic() - started),
               config=cfg.to_dict())
    from fusion_ray.progress import rate

    scored = sum(len(c) for c in conversations.values()) * len(models)
    log(f"[eval] {len(models)} arms: {rate(scored, time.monotonic() - started, 'conversations')}; "
        f"report: {out_dir}/report.md")
    return StageResult("done", [out_dir], {"report": f"{out_dir}/report.md", "bpb": bpb})
