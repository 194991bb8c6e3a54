"""Chat evaluation inside the `eval` stage: answers, the LLM judge and lm-eval, for both methods.

`eval.chat`: the chosen arms answer the question file turn by turn (`evaluate/answers.py`, a Ray
Data pass per arm, or an OpenAI-compatible endpoint per `eval.chat.endpoints` arm), then the
optional judge grades them (`evaluate/judging.py`: single-answer grades and/or pairwise against a
baseline arm, with bootstrap intervals and the length-controlled win rate). `eval.lm_eval`:
lm-evaluation-harness tasks on arms' model dirs and/or an endpoint (`evaluate/lmeval.py`).

Answers and judgements are cached under `{workdir}/chat/` by what determines them, so a rerun
(another bootstrap count, a new judge mode, a forced eval) reuses them and makes no call it made
before. What a report used is copied into the report dir for audit: `chat_answers.jsonl`,
`chat_arms.json` (each arm's chat template and sampling), `chat_judgements.jsonl`,
`lm_eval_samples.json`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fusion_ray import io
from fusion_ray.evaluate.selection import pick

if TYPE_CHECKING:
    from fusion_ray.config import FusionConfig

JUDGEMENTS_DIR = "chat/judgements"


def default_arms(arms: dict[str, str]) -> list[str]:
    """The arms chat evaluation answers when `eval.chat.arms` is not given: the pivot and every
    trained arm (the sources are left out: they are the largest and the least asked about)."""
    return [a for a in arms if not a.startswith("source:")]


def run_chat(cfg, arms: dict[str, str], out, log=print, given: tuple[list[dict], dict[str, list[dict]]] | None = None
             ) -> dict:
    """Answers (and judge results) of `eval.chat`; writes the audit files into `out`.

    `given`: (questions, answers per arm) the caller already has (the implicit method's answers to
    its held-out prompts without a verifier, `eval.chat.questions` unset); then nothing is answered
    here, only judged."""
    from fusion_ray.evaluate.report import ci_text

    chat = cfg.eval.chat
    if given is None:
        from fusion_ray.evaluate.answers import answer_arms, read_record

        chosen = pick(chat.arms, arms, default_arms(arms), "eval.chat.arms")
        answering = {**chosen, **chat.endpoints}
    else:
        answering = given[1]
    if chat.judge and "pairwise" in chat.judge.modes:
        missing = [b for b in chat.judge.baselines if b not in answering]
        if missing:
            raise ValueError(f"eval.chat.judge.baseline: {', '.join(map(repr, missing))} not among the answering "
                             f"arms ({', '.join(sorted(answering))})")
    if given is None:
        questions, plans, answers = answer_arms(cfg, chosen, log=log)
        records = {arm: read_record(plan.path) for arm, plan in plans.items()}
        io.write_json_atomic(out.path("chat_arms.json"), records)  # each arm's chat template and sampling
    else:
        questions, answers, records = given[0], given[1], {}
    lines = [json.dumps(a, ensure_ascii=False) for arm in answers for a in answers[arm]]
    io.write_bytes_atomic(out.path("chat_answers.jsonl"), ("\n".join(lines) + "\n").encode())
    result: dict = {"arms": sorted(answers), "questions": len(questions),
                    "answered": {arm: len(rows) for arm, rows in answers.items()},
                    "sampling": {arm: r["sampling"] for arm, r in records.items()},
                    "chat_template_sha256": {arm: r["chat_template_sha256"] for arm, r in records.items()}}
    if given is not None:
        result["source"] = "held-out prompts without a verifier (the eval stage's greedy answers)"
    if chat.judge is not None:
        from fusion_ray.evaluate.judging import judge_answers

        judged = judge_answers(chat.judge, questions, answers, f"{cfg.workdir.rstrip('/')}/{JUDGEMENTS_DIR}",
                               log=log)
        judgements = judged.pop("judgements")
        io.write_bytes_atomic(out.path("chat_judgements.jsonl"),
                              ("\n".join(json.dumps(r, ensure_ascii=False) for r in judgements) + "\n").encode())
        result["judge"] = {"model": chat.judge.name, "kind": "reward model" if chat.judge.reward_model else "LLM",
                           "modes": list(chat.judge.modes), "baseline": chat.judge.baselines,
                           "samples": chat.judge.samples, **judged}
        for arm, res in judged["arms"].items():
            parts = []
            if res.get("single"):
                s = res["single"]
                parts.append(f"score {s['mean']:.2f}{ci_text(s.get('ci'), False)}")
            for p in (res.get("pairwise") or {}).values():
                parts.append(f"win rate vs {p['baseline']} {p['win_rate']:.1%}{ci_text(p.get('ci'), True)}, "
                             f"LC {p['lc_win_rate']:.1%}{ci_text(p.get('lc_ci'), True)}")
            if parts:
                log(f"[eval] judge {arm}: " + "; ".join(parts))
    return result


def run_lm_eval(cfg, arms: dict[str, str], out, log=print) -> dict:
    """`eval.lm_eval` on the arms it names and its endpoint; per-item samples go to `out`."""
    from fusion_ray.evaluate import lmeval

    spec = cfg.eval.lm_eval
    flags = {arm: cfg.pivot.trust_remote_code for arm in arms}
    flags.update({f"source:{s.name}": s.trust_remote_code for s in cfg.sources})
    result = lmeval.run_lm_eval(spec, arms, log=log, trust_remote_code=flags)
    io.write_json_atomic(out.path("lm_eval_samples.json"), result.pop("samples", {}))
    return result


def chat_sections(cfg: FusionConfig, models: dict[str, str], out, log=print, given=None) -> dict:
    """The report's `chat` (eval.chat: answers, judge) and `lm_eval` (eval.lm_eval) parts, when set
    (`given`: see `run_chat`)."""
    sections = {}
    if cfg.eval.chat is not None:
        sections["chat"] = run_chat(cfg, models, out, log, given)
    if cfg.eval.lm_eval is not None:
        sections["lm_eval"] = run_lm_eval(cfg, models, out, log)
    return sections
