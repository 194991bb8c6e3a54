"""The `eval` stage of implicit fusion: every arm answers the held-out prompts, the verifiers and
the reward model judge the answers → `report/report.{json,md,png}`.

Arms: `pivot` (the untrained target), `sft` and `dpo` (SFT then DPO), and `only-<source>` for
each single-source arm (SFT then DPO on that source's samples only, `arms.py`), each
once its stage has finished. The answers come from the `sample` stage run again, on a config of
its own below `<workdir>/_eval/` (`answers_config`: the arms as its sources, `implicit.heldout` as
its prompts, one greedy answer per prompt, `eval.max_new_tokens`); then the `reward` stage scores
them with the same verifiers, sandbox and reward model as the training data. The pipeline runs
both before this stage (`pipeline.run_stage`): this package imports no other stage. Both are
resumable stages with manifests, so an interrupted evaluation redoes only what is missing.

The report, per arm: accuracy on each verifiable domain (correct / held-out prompts, a prompt the
arm could not answer counting as wrong), mean reward per domain, and the win rate against the
pivot: over the held-out prompts, the share where the arm's reward beats the pivot's (ties half).
The reward is the reward model's score where there is one, else 1 for a correct answer, 0
otherwise (`by` in the report says which).
"""

from __future__ import annotations

import time

from fusion_ray import io
from fusion_ray.arms import SINGLE, arm_dir, arm_source, training_arms
from fusion_ray.config import FusionConfig, SamplingSpec
from fusion_ray.contract import StageResult

ARM_STAGES = ("sft", "dpo")  # trained arms, in the order they are made
LABELS = {"pivot": "pivot", "sft": "SFT", "dpo": "SFT+DPO"}


def arms(cfg: FusionConfig) -> dict[str, str]:
    """Arm → model location: the pivot, and every trained arm whose stage has finished (a
    single-source arm once its DPO model has)."""
    out = {"pivot": cfg.pivot.path}
    for stage in ARM_STAGES:
        if io.read_manifest(cfg.stage_dir(stage)) is not None:
            out[stage] = cfg.stage_dir(stage)
    for arm in training_arms(cfg)[1:]:
        if io.read_manifest(arm_dir(cfg, "dpo", arm)) is not None:
            out[arm] = arm_dir(cfg, "dpo", arm)
    from fusion_ray.checkpoint.adapter import dense_start  # LoRA targets (train.peft) are scored by their dense weights

    return {arm: path if arm == "pivot" else dense_start(path) for arm, path in out.items()}


def label(arm: str) -> str:
    """How the report names an arm."""
    source = arm_source(arm) if arm.startswith(SINGLE) else None
    return f"{source} only" if source else LABELS[arm]


def eval_config(cfg: FusionConfig, models: dict[str, str]) -> FusionConfig:
    """The sample/reward config that answers the held-out prompts: the arms as sources, greedy."""
    greedy = SamplingSpec(temperature=0.0, top_p=1.0, repetition_penalty=1.0, max_tokens=cfg.eval.max_new_tokens)
    sources = [cfg.pivot.model_copy(update={"name": arm, "path": path, "domain": None, "sampling": greedy,
                                            # trained arms carry the pivot's tokenizer files in their dir
                                            "tokenizer": cfg.pivot.tokenizer if arm == "pivot" else None,
                                            "revision": cfg.pivot.revision if arm == "pivot" else None})
               for arm, path in models.items()]
    implicit = cfg.implicit.model_copy(update={"prompts": cfg.implicit.heldout, "heldout": [], "samples": 1,
                                               "sampling": greedy, "single_source_arms": []})
    # the sub-config's own pivot is never run; renamed so that an arm (`pivot`) cannot clash with it
    pivot = cfg.pivot.model_copy(update={"name": "eval-pivot" if "eval-pivot" not in models else "eval-pivot-"})
    # it only samples and scores: the chat judge and lm-eval belong to this stage, not to it
    return cfg.model_copy(update={"workdir": f"{cfg.workdir.rstrip('/')}/_eval", "sources": sources,
                                  "pivot": pivot, "implicit": implicit,
                                  "eval": cfg.eval.model_copy(update={"chat": None, "lm_eval": None})})


def answers_config(cfg: FusionConfig) -> FusionConfig:
    """The config the pipeline runs `sample` then `reward` on before this stage: every arm that
    exists answers the held-out prompts, and the answers are scored.

    Raises:
        ValueError: there are no held-out prompts.
    """
    if not cfg.implicit.heldout:
        raise ValueError("eval: implicit fusion is evaluated on `implicit.heldout` prompts, and there are none")
    return eval_config(cfg, arms(cfg))


def answer_log(log):
    """`log` with the sub-stages' tags read as parts of eval."""
    return lambda line: log(line.replace("[sample]", "[eval] answers:").replace("[reward]", "[eval] scores:"))


def tally(rows: list[dict], prompts: dict[str, str], arm_names: list[str], by_reward_model: bool) -> dict:
    """The report's numbers from scored answer rows (one per arm and answered prompt).

    `prompts`: every held-out prompt id → its domain (an arm with no row for a prompt did not
    answer it: wrong, reward 0). Verifiable domains are those with a verdict on some row."""
    answers = {(r["source"], r["prompt_id"]): r for r in rows}
    domains = sorted(set(prompts.values()))
    verifiable = {r["domain"] for r in rows if r["verifiable"]}
    accuracy, mean_reward, counts, win = {}, {}, {}, {}
    for arm in arm_names:
        accuracy[arm], mean_reward[arm], counts[arm] = {}, {}, {}
        for domain in domains:
            ids = [p for p, d in prompts.items() if d == domain]
            got = [answers.get((arm, p)) for p in ids]
            correct = sum(1 for a in got if a is not None and a["correct"])
            counts[arm][domain] = {"prompts": len(ids), "answered": sum(a is not None for a in got),
                                   "correct": correct if domain in verifiable else None}
            if domain in verifiable:
                accuracy[arm][domain] = correct / len(ids)
            mean_reward[arm][domain] = sum(a["reward"] for a in got if a is not None) / len(ids)
    for arm in arm_names:
        if arm == "pivot" or "pivot" not in arm_names:
            continue
        score = 0.0
        for p in prompts:
            mine, base = answers.get((arm, p)), answers.get(("pivot", p))
            a = mine["reward"] if mine else 0.0
            b = base["reward"] if base else 0.0
            score += 1.0 if a > b else 0.5 if a == b else 0.0
        win[arm] = score / max(len(prompts), 1)
    overall = {arm: sum(c["correct"] for d, c in counts[arm].items() if d in verifiable)
               / max(sum(c["prompts"] for d, c in counts[arm].items() if d in verifiable), 1)
               for arm in arm_names} if verifiable else {}
    singles = [arm for arm in arm_names if arm.startswith(SINGLE)]
    best = max(singles, key=lambda a: (overall[a], a)) if singles and overall else None
    return {"accuracy": accuracy, "accuracy_all": overall, "mean_reward": mean_reward, "win_rate_vs_pivot": win,
            "counts": counts, "by": "reward_model" if by_reward_model else "verifier",
            # the fused SFT+DPO arm against the best single-source arm, over every verifiable prompt
            "best_single": best,
            "fused_vs_best_single": overall["dpo"] - overall[best] if best and "dpo" in overall else None}


def open_answers(prompt_rows: list[dict], rows: list[dict], arm_names: list[str]
                 ) -> tuple[list[dict], dict[str, list[dict]]]:
    """The held-out prompts without a verifier as chat questions (`question_id`, `category`: the
    domain, `turns`: one, a multi-turn prompt's earlier messages written into it), and each arm's
    greedy answer to them, for the chat judge (`eval.chat` with no question file). A prompt an arm
    did not answer is left out of that arm's pairs."""
    import json

    questions = []
    for r in prompt_rows:
        if r["verify"] != "none":
            continue
        msgs = json.loads(r["messages"])
        turn = msgs[-1]["content"] if len(msgs) == 1 else "\n\n".join(f"{m['role']}: {m['content']}" for m in msgs)
        questions.append({"question_id": r["prompt_id"], "category": r["domain"], "turns": [turn]})
    wanted = {q["question_id"] for q in questions}
    answers: dict[str, list[dict]] = {arm: [] for arm in arm_names}
    for r in sorted(rows, key=lambda r: (r["source"], r["prompt_id"])):
        if r["prompt_id"] in wanted and r["source"] in answers:
            answers[r["source"]].append({"arm": r["source"], "question_id": r["prompt_id"],
                                         "answers": [r["response"]]})
    return questions, answers


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    import pyarrow as pa

    from fusion_ray.evaluate.chat import chat_sections
    from fusion_ray.evaluate.report import stage_stats, write_report
    from fusion_ray.schema import PROMPTS_DIR

    started = time.monotonic()
    models = arms(cfg)
    sub = eval_config(cfg, models)
    rewards_dir = sub.stage_dir("reward")
    scored = io.read_manifest(rewards_dir)
    if scored is None:
        raise ValueError(f"eval: the arms' answers are not scored yet ({rewards_dir}); the pipeline samples and "
                         "scores them before this stage (`fusion-ray run --stages eval`, `pipeline.run_stage`)")
    rewards_fp = scored["fingerprint"]
    out_dir = cfg.stage_dir("eval")
    out = io.begin(out_dir, io.fingerprint("eval-implicit", rewards_fp, sorted(models.items()),
                                                 {k: cfg.to_dict()["eval"][k] for k in ("chat", "lm_eval")}), force)
    if out is None:
        return StageResult.skipped(out_dir, report=f"{out_dir}/report.md")
    prompt_table = pa.concat_tables([io.read_table(f, columns=["prompt_id", "domain", "verify", "messages"])
                                     for f in io.list_files(f"{sub.stage_dir('sample')}/{PROMPTS_DIR}")])
    prompt_rows = prompt_table.to_pylist()
    prompts = {r["prompt_id"]: r["domain"] for r in prompt_rows}
    rows = pa.concat_tables([io.read_table(f) for f in io.list_files(rewards_dir)]).to_pylist()
    report = {"method": "implicit", **tally(rows, prompts, list(models), cfg.implicit.reward is not None),
              "labels": {arm: label(arm) for arm in models}, "models": models,
              "stages": stage_stats(cfg), "config": cfg.name}
    chat = cfg.eval.chat
    given = open_answers(prompt_rows, rows, list(models)) if chat is not None and chat.questions is None else None
    report.update(chat_sections(cfg, models, out, log, given))
    for arm in models:
        log(f"[eval] {label(arm):<8} " + "  ".join(
            [f"{d} {v:.1%}" for d, v in report["accuracy"][arm].items()]
            + ([f"win rate vs pivot {report['win_rate_vs_pivot'][arm]:.1%}"] if arm in report["win_rate_vs_pivot"]
               else [])))
    write_report(report, out)
    out.commit(io.Manifest(stage="eval", fingerprint=out.fingerprint, config_hash=cfg.config_hash(),
                           inputs={"rewards": rewards_fp},
                           rows={"in": len(prompts), "out": len(rows)}, wall_time_s=time.monotonic() - started,
                           extra={"arms": list(models)}), config=cfg.to_dict())
    return StageResult("done", [out_dir], {"accuracy": report["accuracy"],
                                           "win_rate_vs_pivot": report["win_rate_vs_pivot"],
                                           "report": f"{out_dir}/report.md"})

