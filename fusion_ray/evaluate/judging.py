"""The judge of chat evaluation (`eval.chat.judge`): single-answer grading and pairwise comparison,
by an LLM behind an OpenAI-compatible endpoint or by a local reward model (pairwise only: the
conversation it scores higher wins, equal scores tie; its output is saved as the LLM judge's is).

Modes (docs/chat_eval.md says more):
- `single`: each answer turn graded 1–10, MT-Bench style. Turn t is shown with the whole
  conversation up to it (the arm's own earlier answers included), and the judge grades the last
  answer; for questions whose category is in `reference_categories` the question's reference
  answers (up to turn t) are in the prompt. The rating is read from `[[r]]`; an output without one
  (or with two different ones, or out of 1..10) is counted as unrated, never guessed.
- `pairwise`: each arm against each `baseline` arm, turn by turn, in both orders (the arm as
  Assistant A, then as B). Verdicts `[[A]]`, `[[B]]`, `[[C]]` (tie). The two orders are read back
  into the arm's frame; when they disagree (the verdict followed the position, not the answer) the
  pair counts as a tie and as `inconsistent`.

`samples` judge calls per item (a different sample index makes a different call), averaged per
item before aggregation. Items are aggregated per question (a question's turns averaged), and the
intervals resample questions (fusion_ray.evaluate.chatstats).

Every call's prompt and raw output is saved under `store_dir` (`{workdir}/chat/judgements/`), keyed
by a hash of what determines the call (judge model, prompt, sample index, temperature,
max_tokens): a rerun re-scores from the saved outputs with no calls, and a run that was killed
resumes with what it had flushed. Saved outputs are parsed again on reuse (the parser may have
improved; the raw output is the evidence). Batches of records are written as new JSONL files with
fusion_ray.io's atomic writes (local disks and object stores alike): a killed run loses at most the
records not yet flushed, never part of a file.

Calls: `concurrency` in flight (a thread pool); retries with exponential back-off and jitter on
429, 408/409, 5xx, timeouts and connection errors (the openai client's own retries are off, so
these are the only ones); a budget of `max_calls` HTTP requests, retries included: past it no
request is made and the items left are counted as `over_budget`. The key comes only from the
environment variable named by `api_key_env`, read before the first call; a named variable that is
missing or empty is an error before any call.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from fusion_ray import io
from fusion_ray.evaluate import chatstats

SYSTEM = "You are a careful and impartial judge of the answers of AI assistants."
RATING_RE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
VERDICT_RE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
FLUSH_EVERY = 64  # records per batch file
FLUSH_S = 30.0  # ... or this long since the last flush, whichever comes first
PREF = {"win": 1.0, "tie": 0.5, "loss": 0.0}


# ---------------------------------------------------------------- parsing


def parse_rating(text: str | None) -> float | None:
    """The `[[r]]` rating, 1 ≤ r ≤ 10; None if absent, ambiguous (different values) or out of range."""
    found = {float(m) for m in RATING_RE.findall(text or "")}
    if len(found) != 1:
        return None
    r = found.pop()
    return r if 1 <= r <= 10 else None


def parse_verdict(text: str | None) -> str | None:
    """"A", "B" or "C" (tie) from `[[A]]` / `[[B]]` / `[[C]]`; None if absent or ambiguous."""
    found = set(VERDICT_RE.findall(text or ""))
    return found.pop() if len(found) == 1 else None


def arm_outcome(verdict: str | None, order: str) -> str | None:
    """A verdict read into the arm's frame: order "AB" shows the arm as Assistant A, "BA" as B."""
    if verdict is None:
        return None
    if verdict == "C":
        return "tie"
    return "win" if (verdict == "A") == (order == "AB") else "loss"


def combine_orders(ab: str, ba: str) -> tuple[str, bool]:
    """(outcome, inconsistent): both orders agree -> that outcome; otherwise a tie (the swap rule)."""
    return (ab, False) if ab == ba else ("tie", True)


# ---------------------------------------------------------------- prompts


def _conversation(turns: list[str], answers: list[str], upto: int, who: str = "Assistant") -> str:
    lines = []
    for t in range(upto):
        lines += [f"### User:\n{turns[t]}", f"### {who}:\n{answers[t]}"]
    return "\n\n".join(lines)


def _references(reference: list[str] | None, upto: int) -> str:
    if not reference:
        return ""
    refs = [f"### Reference answer to user question {t + 1}:\n{reference[t]}"
            for t in range(min(upto, len(reference)))]
    return "[The Start of the Reference Answers]\n" + "\n\n".join(refs) + "\n[The End of the Reference Answers]\n\n"


def single_messages(turns: list[str], answers: list[str], turn: int, reference: list[str] | None) -> list[dict]:
    """The grading prompt of turn `turn` (1-based): the conversation so far, the last answer graded."""
    which = "its answer" if turn == 1 else f"its answer to user question {turn} (the last one)"
    ref = ("Compare it with the reference answer, which is correct; an answer that contradicts the "
           "reference is wrong. " if reference else "")
    text = (f"Judge the AI assistant in the conversation below: grade {which}, using the earlier turns "
            "only as context. Weigh helpfulness, relevance, accuracy, depth, creativity and level of "
            f"detail. {ref}Do not let the answer's length sway you. Explain your judgement briefly and as "
            "objectively as you can, then end with your rating from 1 to 10, written exactly in this "
            "form: \"Rating: [[5]]\".\n\n"
            + _references(reference, turn)
            + "[The Start of the Conversation]\n" + _conversation(turns, answers, turn)
            + "\n[The End of the Conversation]")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def pairwise_messages(turns: list[str], answers_a: list[str], answers_b: list[str], turn: int,
                      reference: list[str] | None) -> list[dict]:
    """The comparison prompt of turn `turn` (1-based): two conversations, their last answers compared."""
    which = "answers to the user question" if turn == 1 else f"answers to user question {turn} (the last one)"
    ref = ("Compare both with the reference answer, which is correct; an answer that contradicts it is "
           "wrong. " if reference else "")
    text = (f"Compare two AI assistants, A and B, in the two conversations below: judge their {which}, "
            "using the earlier turns only as context. Weigh helpfulness, relevance, accuracy, depth, "
            f"creativity and level of detail. {ref}The order in which the assistants appear and the "
            "length of their answers must not sway you, nor their names. Explain briefly, then end "
            "with your verdict, exactly one of: \"[[A]]\" if A is better, \"[[B]]\" if B is better, "
            "\"[[C]]\" for a tie.\n\n"
            + _references(reference, turn)
            + "[The Start of Assistant A's Conversation]\n" + _conversation(turns, answers_a, turn, "Assistant A")
            + "\n[The End of Assistant A's Conversation]\n\n"
            + "[The Start of Assistant B's Conversation]\n" + _conversation(turns, answers_b, turn, "Assistant B")
            + "\n[The End of Assistant B's Conversation]")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def call_key(model: str, messages: list[dict], sample: int, temperature: float, max_tokens: int) -> str:
    """What determines a judge call, hashed: the name of its saved judgement."""
    blob = json.dumps([model, messages, sample, temperature, max_tokens], sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class Request:
    key: str
    messages: list[dict]
    meta: dict  # mode, arm, baseline, question_id, turn, order, sample
    # pairwise: the two conversations up to the judged turn as chats ({role, content}), A then B;
    # what a reward-model judge scores
    chats: tuple[list[dict], list[dict]] | None = None


def as_chat(turns: list[str], answers: list[str], upto: int) -> list[dict]:
    """A conversation's first `upto` turns as chat messages (the answer to turn `upto` last)."""
    out: list[dict] = []
    for t in range(upto):
        out += [{"role": "user", "content": turns[t]}, {"role": "assistant", "content": answers[t]}]
    return out


# ---------------------------------------------------------------- the store


class JudgementStore:
    """Saved judgements under `root`: JSONL batch files, each written atomically, read as one map."""

    def __init__(self, root: str, log=print, flush_every: int = FLUSH_EVERY, flush_s: float = FLUSH_S):
        self.root = root.rstrip("/")
        self.log = log
        self.flush_every, self.flush_s = flush_every, flush_s
        self._pending: list[dict] = []
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self.files_written = 0

    def load(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        bad = 0
        for path in io.list_files(self.root, suffix=".jsonl"):
            for line in io.read_text(path).splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    out[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    bad += 1
        if bad:
            self.log(f"[judge] {bad} unreadable saved judgement line(s) under {self.root} ignored")
        return out

    def add(self, record: dict) -> None:
        with self._lock:
            self._pending.append(record)
            due = len(self._pending) >= self.flush_every or time.monotonic() - self._last >= self.flush_s
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._last = time.monotonic()
            if not batch:
                return
            name = f"{self.root}/judgements-{time.time_ns()}-{uuid.uuid4().hex[:8]}.jsonl"
            data = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in batch)
            io.write_bytes_atomic(name, data.encode())
            self.files_written += 1


# ---------------------------------------------------------------- calls


class JudgeAuthError(RuntimeError):
    """The judge endpoint refused the key: every further call would fail the same way."""


@dataclass
class Caller:
    """Judge calls with retries, back-off and a budget shared by every thread."""

    judge: object  # JudgeConfig
    client: object  # openai.OpenAI
    calls: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    fatal: str | None = None

    def _take(self) -> bool:
        with self._lock:
            if self.calls >= self.judge.max_calls:
                return False
            self.calls += 1
            return True

    def call(self, messages: list[dict]) -> tuple[str | None, str, str | None]:
        """(output, "ok" | "failed" | "over_budget", last error)."""
        import openai

        j = self.judge
        error = None
        for attempt in range(j.max_retries + 1):
            if self._stop.is_set():
                return None, "failed", self.fatal
            if not self._take():
                return None, "over_budget", error
            try:
                resp = self.client.chat.completions.create(
                    model=j.model, messages=messages, temperature=j.temperature, max_tokens=j.max_tokens)
                return resp.choices[0].message.content or "", "ok", None
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                self.fatal = f"the judge endpoint {j.url} refused the key ({err.status_code}): {err}"
                self._stop.set()
                return None, "failed", self.fatal
            except openai.APIStatusError as err:
                error = f"HTTP {err.status_code}: {err.message}"
                if not (err.status_code in (408, 409, 429) or err.status_code >= 500):
                    return None, "failed", error  # a request the endpoint will never accept
            except openai.APIConnectionError as err:  # timeouts included
                error = f"{type(err).__name__}: {err}"
            if attempt < j.max_retries:
                with self._lock:
                    self.retries += 1
                # exponential back-off with jitter, so that throttled threads do not retry in step
                time.sleep(j.backoff_s * (2 ** attempt) * (0.5 + random.random()))
        return None, "failed", error


def api_key(judge) -> str:
    """The key from the env var `api_key_env` names ("EMPTY" when none is named: a local judge)."""
    if judge.api_key_env is None:
        return "EMPTY"
    key = os.environ.get(judge.api_key_env, "")
    if not key.strip():
        raise ValueError(f"eval.chat.judge.api_key_env: the environment variable {judge.api_key_env} "
                         "is not set or is empty (the judge's key is read from it; it is never in a config)")
    return key


def make_client(judge):
    from openai import OpenAI

    # max_retries=0: our retries (with the budget counting each one) are the only ones
    return OpenAI(base_url=judge.url, api_key=api_key(judge), max_retries=0, timeout=judge.timeout_s)


# ---------------------------------------------------------------- requests


def _questions_by_id(questions: list[dict]) -> dict[str, dict]:
    out = {}
    for q in questions:
        qid = str(q["question_id"])
        if qid in out:
            raise ValueError(f"chat questions: question_id {qid} appears twice")
        out[qid] = q
    return out


def _answers_by_id(answers: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    return {arm: {str(a["question_id"]): a for a in rows} for arm, rows in answers.items()}


def pairings(judge, arms) -> list[tuple[str, str]]:
    """(arm, baseline) pairs judged pairwise: every arm against each baseline, a pair of two
    baselines once (against the one named first)."""
    baselines = judge.baselines
    return [(arm, b) for i, b in enumerate(baselines) for arm in sorted(arms)
            if arm != b and arm not in baselines[:i]]


def build_requests(judge, questions: list[dict], answers: dict[str, list[dict]]) -> list[Request]:
    qs = _questions_by_id(questions)
    by_arm = _answers_by_id(answers)
    refcats = set(judge.reference_categories)
    reqs: list[Request] = []

    def add(messages, chats=None, **meta):
        for s in range(judge.samples):
            key = call_key(judge.name, messages, s, judge.temperature, judge.max_tokens)
            reqs.append(Request(key, messages, {**meta, "sample": s}, chats))

    def reference(q):
        return q.get("reference") if q.get("category") in refcats and q.get("reference") else None

    if "single" in judge.modes:
        for arm in sorted(by_arm):
            for qid, q in qs.items():
                a = by_arm[arm].get(qid)
                if a is None:
                    continue
                for t in range(1, min(len(q["turns"]), len(a["answers"])) + 1):
                    add(single_messages(q["turns"], a["answers"], t, reference(q)), mode="single", arm=arm,
                        baseline=None, question_id=qid, turn=t, order=None)
    if "pairwise" in judge.modes:
        for arm, baseline in pairings(judge, by_arm):
            base = by_arm[baseline]
            for qid, q in qs.items():
                a, b = by_arm[arm].get(qid), base.get(qid)
                if a is None or b is None:
                    continue
                for t in range(1, min(len(q["turns"]), len(a["answers"]), len(b["answers"])) + 1):
                    for order, (x, y) in (("AB", (a, b)), ("BA", (b, a))):
                        chats = ((as_chat(q["turns"], x["answers"], t), as_chat(q["turns"], y["answers"], t))
                                 if judge.reward_model is not None else None)  # what only a reward model scores
                        add(pairwise_messages(q["turns"], x["answers"], y["answers"], t, reference(q)), chats,
                            mode="pairwise", arm=arm, baseline=baseline, question_id=qid, turn=t, order=order)
    return reqs


# ---------------------------------------------------------------- a reward model as the judge


def reward_verdict(score_a: float, score_b: float) -> str:
    """A reward-model judge's output: both scores and the verdict in the LLM judge's form (equal
    scores, as for the same answer twice, are a tie)."""
    verdict = "A" if score_a > score_b else "B" if score_b > score_a else "C"
    return f"reward A {score_a:.6g}, reward B {score_b:.6g}: [[{verdict}]]"


def score_chats(spec, chats: list[list[dict]]) -> list[float]:
    """The reward model's score of each chat, in this process."""
    from fusion_ray import locations
    from fusion_ray.engines.reward_model import RewardScorer

    scorer = RewardScorer(locations.local_dir(spec.path, revision=spec.revision), dtype=spec.dtype,
                          trust_remote_code=spec.trust_remote_code, max_length=spec.max_length,
                          batch_size=spec.batch_size)
    return scorer.score(chats)


def reward_judgements(judge, todo: list[Request], log=print) -> dict[str, str]:
    """Outputs of a reward-model judge for `todo` (key → output): every distinct chat scored once,
    in a Ray task with the reward model's resources when Ray is up (a GPU node for a large one),
    else in this process."""
    import ray

    def text(chat: list[dict]) -> str:
        return json.dumps(chat, sort_keys=True, ensure_ascii=False)

    distinct: dict[str, list[dict]] = {}
    for r in todo:
        for chat in r.chats:
            distinct.setdefault(text(chat), chat)
    chats = list(distinct.values())
    started = time.monotonic()
    spec = judge.reward_model
    if ray.is_initialized():
        task = ray.remote(score_chats).options(num_cpus=spec.num_cpus_per_actor, num_gpus=spec.num_gpus_per_actor)
        scores = ray.get(task.remote(spec, chats))
    else:
        scores = score_chats(spec, chats)
    by_text = dict(zip(distinct, scores, strict=True))
    log(f"[judge] reward model {spec.path}: {len(chats)} conversations scored in {time.monotonic() - started:.1f}s")
    return {r.key: reward_verdict(*(by_text[text(c)] for c in r.chats)) for r in todo}


# ---------------------------------------------------------------- aggregation


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _single_results(judge, qs: dict[str, dict], reqs: list[Request], parsed: dict[str, object],
                    status: dict[str, str]) -> dict:
    items: dict[tuple, list] = defaultdict(list)  # (qid, turn) -> ratings of the judged samples
    for r in reqs:
        if status[r.key] in ("ok", "reused"):
            items[(r.meta["question_id"], r.meta["turn"])].append(parsed[r.key])
    all_items = {(r.meta["question_id"], r.meta["turn"]) for r in reqs}
    scores = {}
    unrated = 0
    for it, vals in items.items():
        rated = [v for v in vals if v is not None]
        if rated:
            scores[it] = sum(rated) / len(rated)
        else:
            unrated += 1
    per_q: dict[str, list] = defaultdict(list)
    for (qid, _), s in scores.items():
        per_q[qid].append(s)
    rank = {q: i for i, q in enumerate(qs)}
    qids = sorted(per_q, key=rank.__getitem__)
    values = [sum(per_q[q]) / len(per_q[q]) for q in qids]
    boot = chatstats.bootstrap_ci(values, judge.bootstrap, judge.seed)
    by_turn = defaultdict(list)
    for (_, t), s in scores.items():
        by_turn[t].append(s)
    by_cat = defaultdict(list)
    for q, v in zip(qids, values, strict=True):
        by_cat[str(qs[q].get("category"))].append(v)
    return {"mean": boot["mean"], "ci": boot["ci"], "n": len(scores), "questions": len(qids),
            "unrated": unrated, "missing": len(all_items) - len(items),
            "by_turn": {str(t): _mean(v) for t, v in sorted(by_turn.items())},
            "by_category": {c: _mean(v) for c, v in sorted(by_cat.items())}}


def _pairwise_results(judge, baseline: str, qs: dict[str, dict], reqs: list[Request], parsed: dict[str, object],
                      status: dict[str, str], lengths: dict[tuple, tuple[int, int]]) -> dict:
    verdicts: dict[tuple, dict] = defaultdict(dict)  # (qid, turn, sample) -> order -> outcome | None
    missing = set()
    for r in reqs:
        m = r.meta
        it = (m["question_id"], m["turn"], m["sample"])
        if status[r.key] in ("ok", "reused"):
            verdicts[it][m["order"]] = arm_outcome(parsed[r.key], m["order"])
        else:
            missing.add(it)
    counts = {"wins": 0, "ties": 0, "losses": 0, "inconsistent": 0}
    prefs: dict[tuple, list] = defaultdict(list)  # (qid, turn) -> preference per sample
    unrated = 0
    for it, by_order in verdicts.items():
        if it in missing:
            continue
        ab, ba = by_order.get("AB"), by_order.get("BA")
        if ab is None or ba is None:
            unrated += 1
            continue
        outcome, inconsistent = combine_orders(ab, ba)
        counts[{"win": "wins", "tie": "ties", "loss": "losses"}[outcome]] += 1
        counts["inconsistent"] += inconsistent
        prefs[it[:2]].append(PREF[outcome])
    item_pref = {it: sum(v) / len(v) for it, v in prefs.items()}
    per_q: dict[str, list] = defaultdict(list)
    for (qid, _), p in item_pref.items():
        per_q[qid].append(p)
    rank = {q: i for i, q in enumerate(qs)}
    qids = sorted(per_q, key=rank.__getitem__)
    boot = chatstats.bootstrap_ci([sum(per_q[q]) / len(per_q[q]) for q in qids], judge.bootstrap, judge.seed)
    items = sorted(item_pref, key=lambda it: (rank[it[0]], it[1]))
    y = [item_pref[it] for it in items]
    la = [lengths[it][0] for it in items]
    lb = [lengths[it][1] for it in items]
    lc = chatstats.lc_win_rate(y, la, lb)
    lc_ci = chatstats.lc_win_rate_ci(y, la, lb, [it[0] for it in items], judge.bootstrap, judge.seed)
    return {"baseline": baseline, "win_rate": boot["mean"], "ci": boot["ci"],
            "lc_win_rate": lc["lc_win_rate"], "lc_ci": lc_ci, "length_slope": lc["length_slope"],
            **counts, "n": len(items), "questions": len(qids), "unrated": unrated,
            "missing": len(missing),
            # each question's preference for the arm (1 win, ½ tie, 0 loss; its turns averaged): what
            # pools over runs (bench/implicit.py)
            "per_question": {q: sum(per_q[q]) / len(per_q[q]) for q in qids}}


# ---------------------------------------------------------------- the public API


def judge_answers(judge, questions: list[dict], answers: dict[str, list[dict]], store_dir: str,
                  log=print) -> dict:
    """Judge every arm's answers (modes of `judge`), calling the judge only for what `store_dir` lacks.

    Returns {"arms": {arm: {"single": {...}, "pairwise": {...}}}, "calls", "retries", "reused",
    "failed", "over_budget", "budget_hit", "judgements": [record used, ...]}."""
    if "pairwise" in judge.modes:
        missing = [b for b in judge.baselines if b not in answers]
        if missing:
            raise ValueError(f"eval.chat.judge.baseline: arm(s) {', '.join(map(repr, missing))} have no answers "
                             f"(arms with answers: {sorted(answers)})")
        if len(answers) < 2:
            raise ValueError("eval.chat.judge.modes: pairwise needs an arm besides the baseline")
    qs = _questions_by_id(questions)
    reqs = build_requests(judge, questions, answers)
    store = JudgementStore(store_dir, log=log)
    saved = store.load()
    unique: dict[str, Request] = {}
    for r in reqs:
        unique.setdefault(r.key, r)
    outputs: dict[str, str] = {}
    status: dict[str, str] = {}
    records: dict[str, dict] = {}
    for k in unique:
        if k in saved:
            outputs[k], status[k], records[k] = saved[k]["output"], "reused", saved[k]
    todo = [r for k, r in unique.items() if k not in saved]
    log(f"[judge] {len(reqs)} judgements ({len(unique)} distinct calls): {len(unique) - len(todo)} saved, "
        f"{len(todo)} to call at concurrency {judge.concurrency}")
    caller = None
    errors: dict[str, int] = defaultdict(int)
    if todo and judge.reward_model is not None:
        for key, out in reward_judgements(judge, todo, log).items():
            r = unique[key]
            outputs[key], status[key] = out, "ok"
            records[key] = {"key": key, "messages": r.messages, "chats": r.chats, "output": out,
                            "judge_model": judge.name, "judge_url": None, "temperature": judge.temperature,
                            "max_tokens": judge.max_tokens, "sample": r.meta["sample"], "meta": r.meta,
                            "created": time.time()}
            store.add(records[key])
        store.flush()
    elif todo:
        caller = Caller(judge, make_client(judge))  # the key is read here: before any call
        started = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=judge.concurrency, thread_name_prefix="judge")
        try:
            futures = {pool.submit(caller.call, r.messages): r for r in todo}
            done = 0
            for fut in as_completed(futures):
                r = futures[fut]
                out, st, err = fut.result()
                status[r.key] = st
                if st == "ok":
                    outputs[r.key] = out
                    rec = {"key": r.key, "messages": r.messages, "output": out, "judge_model": judge.name,
                           "judge_url": judge.url, "temperature": judge.temperature,
                           "max_tokens": judge.max_tokens, "sample": r.meta["sample"], "meta": r.meta,
                           "created": time.time()}
                    records[r.key] = rec
                    store.add(rec)
                elif st == "failed" and err:
                    errors[err[:120]] += 1
                done += 1
                if done % max(1, len(todo) // 10) == 0 or done == len(todo):
                    log(f"[judge] {done}/{len(todo)} calls done, {caller.calls} requests "
                        f"({caller.retries} retries), {time.monotonic() - started:.1f}s")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            store.flush()
        if caller.fatal:
            raise RuntimeError(f"eval.chat.judge: {caller.fatal}; judgements so far are saved under {store_dir}")
    for err, n in sorted(errors.items(), key=lambda kv: -kv[1])[:5]:
        log(f"[judge] {n} call(s) failed after {judge.max_retries} retries: {err}")
    parsed: dict[str, object] = {}
    for r in reqs:
        if r.key in outputs and r.key not in parsed:
            parse = parse_rating if r.meta["mode"] == "single" else parse_verdict
            parsed[r.key] = parse(outputs[r.key])
    by_arm = _answers_by_id(answers)
    arms: dict[str, dict] = {}
    if "single" in judge.modes:
        for arm in sorted(by_arm):
            mine = [r for r in reqs if r.meta["mode"] == "single" and r.meta["arm"] == arm]
            arms.setdefault(arm, {})["single"] = _single_results(judge, qs, mine, parsed, status)
    if "pairwise" in judge.modes:
        for arm, baseline in pairings(judge, by_arm):
            base = by_arm[baseline]
            mine = [r for r in reqs if r.meta["mode"] == "pairwise" and r.meta["arm"] == arm
                    and r.meta["baseline"] == baseline]
            lengths = {(r.meta["question_id"], r.meta["turn"]):
                       (len(by_arm[arm][r.meta["question_id"]]["answers"][r.meta["turn"] - 1]),
                        len(base[r.meta["question_id"]]["answers"][r.meta["turn"] - 1])) for r in mine}
            arms.setdefault(arm, {}).setdefault("pairwise", {})[baseline] = _pairwise_results(
                judge, baseline, qs, mine, parsed, status, lengths)
    used = [{**r.meta, "key": r.key, "messages": r.messages, "output": outputs[r.key], "parsed": parsed[r.key],
             "judge_model": judge.name, "reused": status[r.key] == "reused"}
            for r in reqs if r.key in outputs]
    failed = sum(st == "failed" for st in status.values())
    over = sum(st == "over_budget" for st in status.values())
    result = {"arms": arms, "calls": caller.calls if caller else 0, "retries": caller.retries if caller else 0,
              "reused": sum(st == "reused" for st in status.values()), "failed": failed,
              "over_budget": over, "budget_hit": over > 0, "judgements": used}
    if over:
        log(f"[judge] budget hit: eval.chat.judge.max_calls={judge.max_calls} requests made, "
            f"{over} call(s) left unjudged (a rerun with a larger budget calls only those)")
    for arm, res in arms.items():
        s, p = res.get("single"), res.get("pairwise")
        if s:
            log(f"[judge] {arm} single: {_fmt(s['mean'])} {_fmt_ci(s['ci'])} over {s['n']} turns "
                f"({s['unrated']} unrated, {s['missing']} not judged)")
        for p in (p or {}).values():
            log(f"[judge] {arm} vs {p['baseline']}: win rate {_fmt(p['win_rate'])} {_fmt_ci(p['ci'])}, "
                f"LC {_fmt(p['lc_win_rate'])} {_fmt_ci(p['lc_ci'])} (W/T/L {p['wins']}/{p['ties']}/"
                f"{p['losses']}, {p['inconsistent']} inconsistent)")
    return result


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _fmt_ci(ci) -> str:
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
