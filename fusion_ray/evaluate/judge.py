"""Optional chat evaluation: MT-Bench-style single-answer grading by an LLM judge.

Each arm answers every question of `eval.judge_prompts` (greedy, its own chat
template); any OpenAI-compatible endpoint (`eval.judge_url`, `eval.judge_model`, key
from the env var `eval.judge_api_key_env`) grades each answer 1–10, and we parse the
`[[rating]]` it must end with. Answers the judge did not rate are counted, not guessed.
"""

from __future__ import annotations

import json
import os
import re
import statistics

GRADER = (
    "[Instruction]\nYou are an impartial judge. Rate the quality of the AI assistant's answer to the "
    "user's question below: helpfulness, relevance, accuracy, depth and level of detail. Explain briefly, "
    "then give a rating from 1 to 10 in exactly this format: \"Rating: [[7]]\".\n\n"
    "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


def read_questions(path: str) -> list[str]:
    from fusion_ray import locations

    out = []
    with open(locations.corpus_path(path)) as fh:  # a local file, or one copied here from a store
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(row["question"] if "question" in row else row["turns"][0])
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
                raise ValueError(f"{path} row {i}: expected a JSON object with `question` or `turns`: {err}") from err
    return out


def answer(model_dir: str, questions: list[str], max_new_tokens: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_ray import locations
    from fusion_ray import tokenizer as tokenizers

    model_dir = locations.local_dir(model_dir)  # a stage dir on a store, a hub id or a demo asset
    tok = tokenizers.from_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    out = []
    for q in questions:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def grade(client, model: str, question: str, reply: str) -> float | None:
    resp = client.chat.completions.create(model=model, temperature=0, max_tokens=512, messages=[
        {"role": "user", "content": GRADER.format(question=question, answer=reply)}])
    match = RATING.search(resp.choices[0].message.content or "")
    return float(match.group(1)) if match else None


def judge_arms(cfg, models: dict[str, str], log=print) -> dict[str, dict]:
    from openai import OpenAI

    e = cfg.eval
    if not (e.judge_model and e.judge_prompts):
        raise ValueError("eval.judge_url needs eval.judge_model and eval.judge_prompts")
    key = os.environ.get(e.judge_api_key_env, "") if e.judge_api_key_env else "none"
    client = OpenAI(base_url=e.judge_url, api_key=key or "none", max_retries=2, timeout=120)
    questions = read_questions(e.judge_prompts)
    out = {}
    prefixes = tuple(x for x in e.judge_arms if x.endswith(":"))  # e.g. "fused:" picks every fused target
    for arm in [a for a in models if a in e.judge_arms or a.startswith(prefixes)]:
        replies = answer(models[arm], questions, e.judge_max_new_tokens)
        scores = [grade(client, e.judge_model, q, r) for q, r in zip(questions, replies, strict=True)]
        rated = [s for s in scores if s is not None]
        out[arm] = {"mean": statistics.fmean(rated) if rated else float("nan"), "n": len(rated),
                    "unrated": len(scores) - len(rated), "answers": replies}
        log(f"[eval] judge {arm}: {out[arm]['mean']:.2f} over {len(rated)} answers")
    return out
