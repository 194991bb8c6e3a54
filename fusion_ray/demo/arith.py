"""A verifiable skill family tiny models learn on a CPU in seconds: small-number arithmetic.

Three operations (`add`, `sub`, `mul`), each a finite table of facts (`a op b = c`) asked in
four phrasings (templates). A response states the equation and its result in the form
`math_correct` (fusion_ray.reward.verify) checks: "17 + 25 = 42. The answer is 42."

The split is by (fact, template): every fact gets one held-out template, drawn with the seed;
its other templates are training templates. Models are trained on facts under their training
templates only, and the held-out prompts ask facts under their held-out template, so a held-out
prompt's text was never trained on but its fact was, under other words: a model that learned
to read the phrasings (and the facts) can answer it, and SFT on a fact's training prompts can
lift the same fact's held-out prompt. Held-out and training prompt texts are disjoint by
construction (one text is one (fact, template)).

Pure Python, deterministic from the seed; no torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OPS = ("add", "sub", "mul")
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
            "What is the sum of {a} and {b}?"),
    "sub": ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
            "What is {b} less than {a}?"),
    "mul": ("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}.",
            "What is the product of {a} and {b}?"),
}
ADD_MAX = 14  # add: a, b in 0..14; sub: a - b with b, a - b in 0..14 (the add table read backwards)
MUL_RANGE = (2, 9)  # mul: a, b in 2..9


@dataclass(frozen=True)
class Fact:
    op: str
    a: int
    b: int

    @property
    def answer(self) -> int:
        return {"add": self.a + self.b, "sub": self.a - self.b, "mul": self.a * self.b}[self.op]

    @property
    def key(self) -> str:
        return f"{self.op}-{self.a}-{self.b}"


def facts(op: str) -> list[Fact]:
    """Every fact of one operation, in a fixed order."""
    if op == "add":
        return [Fact("add", a, b) for a in range(ADD_MAX + 1) for b in range(ADD_MAX + 1)]
    if op == "sub":
        return [Fact("sub", b + c, b) for b in range(ADD_MAX + 1) for c in range(ADD_MAX + 1)]
    if op == "mul":
        lo, hi = MUL_RANGE
        return [Fact("mul", a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")


def prompt_text(fact: Fact, template: int) -> str:
    return TEMPLATES[fact.op][template].format(a=fact.a, b=fact.b)


def gold_response(fact: Fact) -> str:
    """The response every model is trained to give (and `math_correct` accepts)."""
    return f"{fact.a} {SYMBOL[fact.op]} {fact.b} = {fact.answer}. The answer is {fact.answer}."


def heldout_template(fact: Fact, seed: int) -> int:
    """The template a fact is held out under (the seed's choice, one per fact)."""
    return random.Random(f"{seed}:heldout:{fact.key}").randrange(len(TEMPLATES[fact.op]))


def train_templates(fact: Fact, seed: int) -> list[int]:
    held = heldout_template(fact, seed)
    return [t for t in range(len(TEMPLATES[fact.op])) if t != held]


def row(fact: Fact, template: int) -> dict:
    """One PromptCorpus row: `{id, prompt, answer, op}` (id names the fact and the template)."""
    return {"id": f"{fact.key}-t{template}", "prompt": prompt_text(fact, template),
            "answer": str(fact.answer), "op": fact.op}


def training_examples(op: str, seed: int) -> list[tuple[str, str]]:
    """(prompt, gold response) for every fact of `op` under each of its training templates:
    what the models are built on (never a held-out prompt)."""
    return [(prompt_text(f, t), gold_response(f)) for f in facts(op) for t in train_templates(f, seed)]


def prompt_sets(seed: int, train_per_op: int, heldout_per_op: int) -> tuple[list[dict], list[dict]]:
    """(arith_train, arith_heldout) prompt rows for the implicit pipeline.

    Per op, `train_per_op` facts are drawn with the seed; each becomes a training prompt under
    each of its training templates (so the SFT:DPO prompt split of the pairs stage puts some
    phrasings of a fact on each side). The first `heldout_per_op` of them also become a held-out
    prompt under their held-out template (a phrasing of that fact no model was built on).
    """
    train, heldout = [], []
    for op in OPS:
        pool = facts(op)
        rng = random.Random(f"{seed}:prompts:{op}")
        chosen = rng.sample(pool, min(train_per_op, len(pool)))
        for i, fact in enumerate(chosen):
            train += [row(fact, t) for t in train_templates(fact, seed)]
            if i < heldout_per_op:
                heldout.append(row(fact, heldout_template(fact, seed)))
    return train, heldout
