"""Chat evaluation, part 1: every arm answers every question, turn by turn, batched.

A later turn's messages carry the arm's OWN earlier answers (MT-Bench's second turn sees the
model's first answer), so generation goes turn by turn over a batch of questions: turn 1 of
every question in the batch in one engine call, then turn 2 with each question's first answer,
and so on (a question with fewer turns drops out).

Model arms (name → model dir) run as one Ray Data pass each: the questions in blocks of
`eval.chat.batch_size`, `map_batches` over a pool of `eval.chat.concurrency` actors
(`num_cpus` / `num_gpus` each), one engine per actor: vLLM's offline engine on token ids
(`implicit.generate.VLLMSampler` given the arm's tokenizer, so its answers are decoded as the
hf engine decodes them), or transformers' `generate` with `eval.chat.engine: hf` (`HFSampler`),
in the checkpoint's own dtype. Each arm templates with its own tokenizer and chat template. A turn's draw is
seeded by (`eval.chat.seed`, question id, turn), so an answer does not depend on the batch around
it. A prompt that leaves no room to answer within the context is recorded with finish reason
"prompt_too_long" and an empty answer, not raised. Arms run side by side (threads on the driver).

Endpoint arms (`eval.chat.endpoints`) are answered by any OpenAI-compatible server through the
official `openai` client, `concurrency` questions in flight, the key from the environment
variable the endpoint names (never from a config).

Outputs are content-addressed under `{workdir}/chat/answers/`: `{arm}-{key}.parquet` (one row
per question: arm, question_id, answers, tokens, finish_reasons) and `{arm}-{key}.json` beside
it (the chat template text and its hash, the sampling settings, the engine, the model's
identity). The key hashes the arm, the model's identity (its stage manifest's fingerprint when
the dir has one, else the fingerprint of its files), the questions' content and the sampling
settings; the engine only when sampling is random (greedy answers are the engine's argmax either
way, and vLLM and transformers draw from different random streams). The Parquet file is written
last and atomically: it marks the arm done, and a rerun reads it instead of generating.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from fusion_ray import io, locations
from fusion_ray.engines.sampling import HFSampler, SampleSettings, VLLMSampler, prompt_seed

ANSWERS_DIR = "chat/answers"
PROMPT_TOO_LONG = "prompt_too_long"
ANSWERS = pa.schema([("arm", pa.string()), ("question_id", pa.string()), ("answers", pa.list_(pa.string())),
                     ("tokens", pa.list_(pa.int64())), ("finish_reasons", pa.list_(pa.string()))])


@dataclasses.dataclass(frozen=True)
class ArmPlan:
    """What one arm's answers are made from, and where they go."""

    arm: str
    kind: str  # "model" or "endpoint"
    source: str  # model dir, or endpoint URL
    identity: str  # model fingerprint, or the endpoint's URL and model name
    key: str
    path: str  # the answers' Parquet file
    record: dict  # the JSON written beside it


def safe_name(arm: str) -> str:
    """An arm name as a file name part (`fused:a+b` → `fused_a_b`); the key disambiguates."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", arm).strip("._")[:80] or "arm"


def model_identity(path: str) -> str:
    """A model dir's identity: its stage manifest's fingerprint (a stage output) or the
    fingerprint of its files (names, sizes, mtimes)."""
    manifest = io.read_manifest(path.removeprefix("file://")) if locations.kind(path) in ("local", "uri") else None
    if manifest and manifest.get("fingerprint"):
        return f"stage:{manifest['fingerprint']}"
    return f"files:{locations.fingerprint(path)}"


def settings(cfg) -> Any:
    """The `SampleSettings` every arm answers with (one answer per turn)."""
    s = cfg.eval.chat.sampling
    return SampleSettings(n=1, temperature=s.temperature, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                          max_tokens=s.max_tokens, seed=cfg.eval.chat.seed)


def turn_id(question_id: str, turn: int) -> str:
    """The id a turn's draw is seeded by (`generate.prompt_seed`)."""
    return json.dumps([question_id, turn])


def plan_arms(cfg, arms: dict[str, str], questions: list[dict]) -> dict[str, ArmPlan]:
    """Each arm's key, file and record; checks first that every model arm's tokenizer loads
    with a chat template and every endpoint's key variable is set."""
    from fusion_ray import tokenizer as tokenizers

    chat = cfg.eval.chat
    both = sorted(set(arms) & set(chat.endpoints))
    if both:
        raise ValueError(f"eval.chat.endpoints: {both} also name model arms; give endpoint arms their own names")
    s = settings(cfg)
    sampling = {**dataclasses.asdict(s), "n": 1}
    questions_fp = io.fingerprint(questions)
    base = f"{cfg.workdir.rstrip('/')}/{ANSWERS_DIR}"
    plans: dict[str, ArmPlan] = {}
    for arm, model_dir in arms.items():
        try:
            tok = tokenizers.from_dir(locations.local_dir(model_dir))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"eval.chat: arm {arm!r}: cannot load its tokenizer from {model_dir}: {err}") from err
        template = getattr(tok, "chat_template", None)
        if not isinstance(template, str) or not template:
            raise ValueError(f"eval.chat: arm {arm!r}: its tokenizer ({model_dir}) has no chat template")
        identity = model_identity(model_dir)
        engine = None if s.temperature < 1e-5 else chat.engine
        key = io.fingerprint("chat-answers", arm, identity, questions_fp, sampling, engine)
        record = {"arm": arm, "model": model_dir, "model_identity": identity, "engine": chat.engine,
                  "chat_template": template, "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
                  "sampling": sampling, "questions": questions_fp, "n_questions": len(questions), "key": key}
        plans[arm] = ArmPlan(arm, "model", model_dir, identity, key, f"{base}/{safe_name(arm)}-{key}.parquet",
                             record)
    for arm, ep in chat.endpoints.items():
        _api_key(arm, ep)  # fail before any work when the variable is not set
        identity = f"endpoint:{ep.url}#{ep.model}"
        key = io.fingerprint("chat-answers", arm, identity, questions_fp, sampling)
        record = {"arm": arm, "endpoint": ep.url, "model": ep.model, "model_identity": identity, "engine": "endpoint",
                  "chat_template": None, "chat_template_sha256": None, "sampling": sampling,
                  "questions": questions_fp, "n_questions": len(questions), "key": key}
        plans[arm] = ArmPlan(arm, "endpoint", ep.url, identity, key, f"{base}/{safe_name(arm)}-{key}.parquet",
                             record)
    return plans


def generate_answers(cfg, arms: dict[str, str], log: Callable[[str], None] = print,
                     force: bool = False) -> dict[str, list[dict]]:
    """arm → its answer dicts: `answer_arms(...)`'s answers."""
    return answer_arms(cfg, arms, log, force)[2]


def answer_arms(cfg, arms: dict[str, str], log: Callable[[str], None] = print,
                force: bool = False) -> tuple[list[dict], dict[str, ArmPlan], dict[str, list[dict]]]:
    """Every arm's answers to `eval.chat.questions` (model arms: `arms`, name → model dir;
    endpoint arms: `eval.chat.endpoints`); arms already answered are read back, not generated.

    Returns:
        (the questions read, arm → its plan (answers file, record), arm → answer dicts {"arm",
        "question_id", "answers", "tokens", "finish_reasons"} in question-file order).

    Raises:
        ValueError: no `eval.chat` section, a bad question file (`questions.QuestionFileError`),
            an arm without a chat template, an endpoint key variable that is not set.
        RuntimeError: an endpoint that cannot be reached (naming the arm and the URL).
    """
    from fusion_ray.evaluate.questions import read_questions
    from fusion_ray.parallel import run_parts

    chat = cfg.eval.chat
    if chat is None:
        raise ValueError("chat answers need the eval.chat section")
    questions = read_questions(chat.questions, max_turns=chat.max_turns, max_questions=chat.max_questions)
    plans = plan_arms(cfg, arms, questions)
    todo = {a: p for a, p in plans.items() if force or not io.exists(p.path)}
    for arm in plans.keys() - todo.keys():
        log(f"[eval] chat answers of {arm}: reused {plans[arm].path}")
    if any(p.kind == "model" for p in todo.values()):
        from fusion_ray.ray_env import init_ray

        init_ray(cfg.ray)
    parts = {a: (lambda p=p: _answer_arm(cfg, p, questions, log)) for a, p in todo.items()}
    if parts:
        run_parts(parts, None, thread_prefix="chat-answers")
    return questions, plans, {arm: read_answers(p.path, arm=arm) for arm, p in plans.items()}


def read_answers(path: str, arm: str | None = None) -> list[dict]:
    """The answer dicts of one arm's answers file (`arm`: the name to give them; default as stored)."""
    rows = io.read_table(path).to_pylist()
    if arm is not None:
        for r in rows:
            r["arm"] = arm
    return rows


def read_record(path: str) -> dict:
    """The JSON beside an answers file (chat template, sampling, engine, model identity)."""
    return json.loads(io.read_text(path.removesuffix(".parquet") + ".json"))


def _answer_arm(cfg, plan: ArmPlan, questions: list[dict], log) -> None:
    from fusion_ray.progress import rate

    started = time.monotonic()
    pass_ = _model_pass if plan.kind == "model" else _endpoint_pass
    rows = pass_(cfg, plan, questions, log)
    order = {q["question_id"]: i for i, q in enumerate(questions)}
    got = {r["question_id"]: r for r in rows}  # a retried task may send a batch twice: one copy each
    missing = sorted(order.keys() - got.keys())
    if missing:
        raise RuntimeError(f"chat answers of {plan.arm}: {len(missing)} question(s) unanswered, e.g. {missing[:3]}")
    table = pa.Table.from_pylist(sorted(got.values(), key=lambda r: order[r["question_id"]]), schema=ANSWERS)
    wall = time.monotonic() - started
    record = {**plan.record, "wall_time_s": round(wall, 3), "versions": io.versions(),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    io.write_json_atomic(plan.path.removesuffix(".parquet") + ".json", record)
    io.write_parquet_atomic(plan.path, table)  # last: marks the arm done
    turns = sum(len(r) for r in table.column("answers").to_pylist())
    tokens = sum(sum(t) for t in table.column("tokens").to_pylist())
    reasons: dict[str, int] = {}
    for rs in table.column("finish_reasons").to_pylist():
        for r in rs:
            reasons[r] = reasons.get(r, 0) + 1
    log(f"[eval] chat answers of {plan.arm}: {rate(turns, wall, 'turns')}, {rate(tokens, wall, 'tokens')}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))


# --- model arms: a Ray Data pass -------------------------------------------------------------


class ChatUDF:
    """Ray Data callable class: one engine per actor; a batch of questions in, their answers out
    (turn by turn, each turn of the batch in one engine call)."""

    def __init__(self, cfg: dict, arm: str, path: str):
        from fusion_ray import tokenizer as tokenizers
        from fusion_ray.config import FusionConfig
        self.cfg = FusionConfig.from_wire(cfg)
        self.arm = arm
        chat = self.cfg.eval.chat
        local = locations.local_dir(path)
        self.tokenizer = tokenizers.from_dir(local)
        self.settings = settings(self.cfg)
        if chat.engine == "vllm":
            self.engine = VLLMSampler(local, tokenizer=self.tokenizer, dtype=checkpoint_dtype(local),
                                      options=_placement(chat).engine_options())
            self.context = self.engine.llm.llm_engine.model_config.max_model_len
        else:
            self.engine = HFSampler(local, self.tokenizer)
            self.context = getattr(self.engine.model.config, "max_position_embeddings", None) or 1 << 30

    def __call__(self, batch: pa.Table) -> pa.Table:
        questions = [{"question_id": q, "turns": json.loads(t)} for q, t in
                     zip(batch.column("question_id").to_pylist(), batch.column("turns").to_pylist(), strict=True)]
        return pa.Table.from_pylist(answer_turns(self.engine, self.tokenizer, self.context, self.settings, self.arm,
                                                 questions), schema=ANSWERS)


def checkpoint_dtype(path: str) -> str:
    """The dtype a model dir's config.json declares (`dtype`, or `torch_dtype` before transformers
    5), for vLLM: its "auto" runs a float32 checkpoint in bfloat16 on CPU, which answers
    differently from the checkpoint itself; "auto" when none is declared."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "auto"
    declared = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return declared if declared in ("float32", "bfloat16", "float16") else "auto"


def answer_turns(engine, tokenizer, context: int, settings, arm: str, questions: list[dict]) -> list[dict]:
    """Answers of one engine to a batch of questions, turn by turn: turn t's messages are the
    question's turns 1..t with the engine's own answers to turns 1..t-1 between them."""
    out = [{"arm": arm, "question_id": q["question_id"], "answers": [], "tokens": [], "finish_reasons": []}
           for q in questions]
    for t in range(max(len(q["turns"]) for q in questions)):
        groups: dict[int, list[tuple[int, list[int]]]] = {}
        for i, q in enumerate(questions):
            if t >= len(q["turns"]):
                continue
            messages = []
            for k in range(t + 1):
                messages.append({"role": "user", "content": q["turns"][k]})
                if k < t:
                    messages.append({"role": "assistant", "content": out[i]["answers"][k]})
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            room = min(settings.max_tokens, context - len(ids))
            if room < 1:  # recorded, not fatal: the conversation leaves no room for an answer
                _put(out[i], "", 0, PROMPT_TOO_LONG)
                continue
            groups.setdefault(room, []).append((i, ids))
        for room, items in groups.items():
            drawn = engine.sample([ids for _, ids in items],
                                  [turn_id(questions[i]["question_id"], t) for i, _ in items],
                                  dataclasses.replace(settings, max_tokens=room))
            for (i, _), (s, *_) in zip(items, drawn, strict=True):
                _put(out[i], s.text, s.tokens, s.finish_reason)
    return out


def _put(row: dict, text: str, tokens: int, reason: str) -> None:
    row["answers"].append(text)
    row["tokens"].append(int(tokens))
    row["finish_reasons"].append(reason)


def _placement(chat):
    from fusion_ray.placement import engine_placement

    return engine_placement(tensor_parallel=1, pipeline_parallel=1, gpus=chat.num_gpus, cpus=chat.num_cpus)


class _Progress:
    """A line per `every_s` seconds with an arm's answered questions (long passes only)."""

    def __init__(self, arm: str, total: int, log, every_s: float = 30.0):
        self.arm, self.total, self.log, self.every_s = arm, total, log, every_s
        self.done, self.started = 0, time.monotonic()
        self.last = self.started

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            self.log(f"[eval] chat answers of {self.arm}: {self.done}/{self.total} questions "
                     f"({now - self.started:.0f}s)")


def _model_pass(cfg, plan: ArmPlan, questions: list[dict], log=print) -> list[dict]:
    import ray

    from fusion_ray.placement import ray_data_args

    chat = cfg.eval.chat
    table = pa.table({"question_id": [q["question_id"] for q in questions],
                      "turns": [json.dumps(q["turns"]) for q in questions]})
    blocks = [table.slice(i, chat.batch_size) for i in range(0, table.num_rows, chat.batch_size)]
    resources = ray_data_args(_placement(chat))
    ds = ray.data.from_arrow(blocks).map_batches(
        ChatUDF, fn_constructor_kwargs={"cfg": cfg.to_wire(), "arm": plan.arm, "path": plan.source},
        batch_size=chat.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(chat.concurrency, len(blocks))), **resources)
    ds.set_name(f"chat_answers_{safe_name(plan.arm)}")
    rows: list[dict] = []
    progress = _Progress(plan.arm, len(questions), log)
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            rows += batch.to_pylist()
            progress.add(batch.num_rows)
    finally:
        if "ray_remote_args_fn" in resources:
            resources["ray_remote_args_fn"].remove()
    return rows


# --- endpoint arms: an OpenAI-compatible server ----------------------------------------------


def _api_key(arm: str, ep) -> str:
    if ep.api_key_env is None:
        return "EMPTY"  # the client wants one; a server without auth ignores it
    key = os.environ.get(ep.api_key_env)
    if not key:
        raise ValueError(f"eval.chat.endpoints.{arm}: the environment variable {ep.api_key_env} (its api_key_env) "
                         "is not set")
    return key


def _endpoint_pass(cfg, plan: ArmPlan, questions: list[dict], log=print) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    import openai

    chat = cfg.eval.chat
    ep = chat.endpoints[plan.arm]
    s = settings(cfg)
    client = openai.OpenAI(base_url=ep.url, api_key=_api_key(plan.arm, ep), max_retries=2, timeout=600)

    def one(q: dict) -> dict:
        row = {"arm": plan.arm, "question_id": q["question_id"], "answers": [], "tokens": [], "finish_reasons": []}
        messages: list[dict] = []
        for t, turn in enumerate(q["turns"]):
            messages.append({"role": "user", "content": turn})
            try:
                resp = client.chat.completions.create(
                    model=ep.model, messages=messages, temperature=s.temperature, top_p=s.top_p,
                    max_tokens=s.max_tokens, seed=prompt_seed(s.seed, turn_id(q["question_id"], t)) % 2**31)
            except openai.APIConnectionError as err:
                raise RuntimeError(f"eval.chat.endpoints.{plan.arm}: cannot reach {ep.url}: {err}") from None
            except openai.APIStatusError as err:
                raise RuntimeError(f"eval.chat.endpoints.{plan.arm}: {ep.url} answered {err.status_code}: "
                                   f"{str(err)[:300]}") from None
            choice = resp.choices[0]
            text = choice.message.content or ""
            tokens = resp.usage.completion_tokens if resp.usage is not None else 0
            _put(row, text, tokens, choice.finish_reason or "stop")
            messages.append({"role": "assistant", "content": text})
        return row

    progress = _Progress(plan.arm, len(questions), log)
    rows = []
    with ThreadPoolExecutor(max_workers=chat.concurrency, thread_name_prefix=f"chat-{safe_name(plan.arm)}") as pool:
        for row in pool.map(one, questions):
            rows.append(row)
            progress.add(1)
    return rows
