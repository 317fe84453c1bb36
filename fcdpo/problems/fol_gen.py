"""Seeded generator of first-order-logic problems (ProofWriter-style) with z3-checked answers.

Each problem has facts ("Alice is kind."), universal rules ("If someone is kind and not young, then they
are furry."), universal facts ("Nobody is red."), existential premises ("Someone is big.") and a question
whose answer is True, False or Unknown under the open-world reading. The answer is *computed* by a
forward-chaining reasoner (with contraposition) that also yields the reasoning depth, and *cross-checked*
by z3 on the formal premises; problems where the two disagree, or whose premises are inconsistent, are
discarded and regenerated.

Difficulty levels: ``easy`` (depth 1-2), ``medium`` (depth 2-3, conjunctions, negation, existentials),
``hard`` (depth 4-5, more of everything and more distractors). ``mixed`` cycles through the three.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from fcdpo.fol import Truth, entails, parse_formula
from fcdpo.problems.base import PROBLEM_SOURCES, Problem

NAMES = [
    "Alice", "Bob", "Charlie", "Dave", "Erin", "Fiona", "Gary", "Harry", "Iris", "Jack",
    "Kate", "Liam", "Mona", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tina", "Victor",
]  # fmt: skip
ADJECTIVES = [
    "kind", "young", "big", "red", "round", "furry", "quiet", "smart", "cold", "green",
    "blue", "rough", "nice", "white", "strong", "happy", "tall", "calm", "brave", "shy",
    "clever", "wise", "funny", "rich", "busy", "loud", "proud", "gentle",
]  # fmt: skip

LEVELS = {
    "easy": dict(depths=(1, 2), entities=2, facts=2, rules=1, conj=0.0, neg=0.2, exist=0.0),
    "medium": dict(depths=(2, 3), entities=3, facts=3, rules=2, conj=0.3, neg=0.3, exist=0.15),
    "hard": dict(depths=(4, 5), entities=4, facts=4, rules=4, conj=0.5, neg=0.4, exist=0.2),
}
GENERIC = "_any"  # an arbitrary element: what holds for it holds for everything


@dataclass(frozen=True)
class Lit:
    pred: str
    pos: bool = True


@dataclass(frozen=True)
class Rule:
    body: tuple[Lit, ...]  # empty body: a universal fact
    head: Lit


@dataclass
class Theory:
    facts: list[tuple[str, Lit]]
    rules: list[Rule]
    existentials: list[tuple[Lit, ...]]


class Inconsistent(Exception):
    pass


def reason(th: Theory, entities: list[str]) -> dict[tuple[str, str], tuple[bool, int]]:
    """Forward chaining (modus ponens and contraposition) by rounds; value and minimal round per literal."""
    ents = [*entities, *(f"_some{i}" for i in range(len(th.existentials))), GENERIC]
    known: dict[tuple[str, str], tuple[bool, int]] = {}

    def put(new: dict, e: str, lit: Lit, depth: int) -> None:
        k = (e, lit.pred)
        if k in known:
            if known[k][0] != lit.pos:
                raise Inconsistent(f"{e} is both {lit.pred} and not")
            return
        if k in new and new[k][0] != lit.pos:
            raise Inconsistent(f"{e} is both {lit.pred} and not")
        new.setdefault(k, (lit.pos, depth))

    init: dict = {}
    for e, lit in th.facts:
        put(init, e, lit, 0)
    for i, conj in enumerate(th.existentials):
        for lit in conj:
            put(init, f"_some{i}", lit, 0)
    known.update(init)
    depth = 0
    while True:
        depth += 1
        new: dict = {}
        for rule in th.rules:
            for e in ents:
                vals = [known.get((e, b.pred)) for b in rule.body]
                if all(v is not None and v[0] == b.pos for v, b in zip(vals, rule.body, strict=True)):
                    put(new, e, rule.head, depth)
                    continue
                h = known.get((e, rule.head.pred))
                if h is None or h[0] == rule.head.pos:
                    continue
                # contraposition: head is false, all body literals but one hold -> that one is false
                open_ = [b for v, b in zip(vals, rule.body, strict=True) if v is None]
                failed = [b for v, b in zip(vals, rule.body, strict=True) if v is not None and v[0] != b.pos]
                if len(open_) == 1 and not failed:
                    put(new, e, Lit(open_[0].pred, not open_[0].pos), depth)
        if not new:
            return known
        known.update(new)


def _answer(known: dict, query: tuple) -> tuple[Truth, int]:
    kind, lit = query[0], query[-1]
    if kind == "ground":
        v = known.get((query[1], lit.pred))
        if v is None:
            return Truth.UNKNOWN, 0
        return (Truth.TRUE if v[0] == lit.pos else Truth.FALSE), v[1]
    hits = [d for (e, p), (val, d) in known.items() if p == lit.pred and val == lit.pos]
    if hits:
        return Truth.TRUE, min(hits)
    g = known.get((GENERIC, lit.pred))
    if g is not None and g[0] != lit.pos:
        return Truth.FALSE, g[1]
    return Truth.UNKNOWN, 0


# ------------------------------------------------------------------------------------ rendering


def _adj(lit: Lit) -> str:
    return lit.pred if lit.pos else f"not {lit.pred}"


def _atom(lit: Lit, term: str) -> str:
    a = f"{lit.pred.capitalize()}({term})"
    return a if lit.pos else f"not {a}"


def _rule_text(rule: Rule, rng: random.Random) -> tuple[str, str]:
    if not rule.body:
        text = f"Everyone is {rule.head.pred}." if rule.head.pos else f"Nobody is {rule.head.pred}."
        return text, f"forall x: {_atom(rule.head, 'x')}"
    body_f = " and ".join(_atom(b, "x") for b in rule.body)
    if len(rule.body) > 1:
        body_f = f"({body_f})"
    formal = f"forall x: {body_f} implies {_atom(rule.head, 'x')}"
    body = " and ".join(_adj(b) for b in rule.body)
    simple = len(rule.body) == 1 and rule.body[0].pos
    choices = [f"If someone is {body}, then they are {_adj(rule.head)}."]
    if simple:
        b = rule.body[0].pred
        choices += [
            f"All {b} people are {_adj(rule.head)}.",
            f"{b.capitalize()} people are {_adj(rule.head)}.",
        ]
    return rng.choice(choices), formal


# ------------------------------------------------------------------------------------ generation


def _draft(rng: random.Random, level: dict, depth: int, target: Truth):
    preds = rng.sample(ADJECTIVES, min(len(ADJECTIVES), depth + 8))
    chain, pool = preds[: depth + 1], preds[depth + 1 :]
    ents = [n.lower() for n in rng.sample(NAMES, level["entities"])]
    e = ents[0]
    th = Theory([], [], [])
    exist = rng.random() < level["exist"]
    start = Lit(chain[0], rng.random() >= level["neg"])
    if not exist:
        th.facts.append((e if target != Truth.UNKNOWN or rng.random() < 0.5 else ents[1], start))
    elif target == Truth.FALSE:
        th.rules.append(Rule((), start))  # everyone is P0
    elif target == Truth.TRUE:
        th.existentials.append((start,))
    prev = start
    qpos = exist or rng.random() < 0.7
    for i in range(1, depth + 1):
        body = [prev]
        if rng.random() < level["conj"] and pool:
            c = Lit(pool.pop(), rng.random() >= level["neg"])
            body.append(c)
            if not exist:
                th.facts.append((e, c))
            elif th.existentials:
                th.existentials[0] = (*th.existentials[0], c)
            else:
                th.rules.append(Rule((), c))
        last = i == depth
        pos = (qpos if target != Truth.FALSE else not qpos) if last else rng.random() >= level["neg"] / 2
        head = Lit(chain[i], pos)
        th.rules.append(Rule(tuple(body), head))
        prev = head
    query_lit = Lit(chain[depth], qpos)
    if exist:
        query = ("exists", Lit(chain[depth], True))
        if target == Truth.FALSE:
            # the chain must end in "not P" for everyone and the question asks "someone is P"
            th.rules[-1] = Rule(th.rules[-1].body, Lit(chain[depth], False))
    elif target == Truth.UNKNOWN and th.facts[0][0] == e:
        query = ("ground", ents[1], query_lit)  # the chain holds for e, the question is about someone else
    else:
        query = ("ground", e, query_lit)
    for _ in range(level["facts"]):
        th.facts.append((rng.choice(ents), Lit(rng.choice(pool or chain), rng.random() >= level["neg"])))
    for _ in range(level["rules"]):
        if len(pool) < 2:
            break
        a, h = rng.sample(pool, 2)
        body = [Lit(a, rng.random() >= level["neg"])]
        if rng.random() < level["conj"]:
            body.append(Lit(rng.choice(preds), rng.random() >= level["neg"]))
        th.rules.append(Rule(tuple(body), Lit(h, rng.random() >= level["neg"])))
    return th, ents, query


def _render(th: Theory, ents: list[str], query: tuple, rng: random.Random, shuffle: bool):
    items: list[tuple[str, str]] = []
    for ent, lit in th.facts:
        name = ent.capitalize()
        items.append((f"{name} is {_adj(lit)}.", _atom(lit, ent)))
    for conj in th.existentials:
        items.append(
            (
                f"Someone is {' and '.join(_adj(c) for c in conj)}.",
                "exists x: " + " and ".join(_atom(c, "x") for c in conj),
            )
        )
    for rule in th.rules:
        items.append(_rule_text(rule, rng))
    seen: set[str] = set()
    items = [it for it in items if not (it[1] in seen or seen.add(it[1]))]  # drop duplicate statements
    if shuffle:
        rng.shuffle(items)
    lit = query[-1]
    if query[0] == "ground":
        q_text, q_formal = f"{query[1].capitalize()} is {_adj(lit)}.", _atom(lit, query[1])
    else:
        q_text, q_formal = f"Someone is {_adj(lit)}.", f"exists x: {_atom(lit, 'x')}"
    return items, q_text, q_formal


def generate_fol_problem(seed: int, index: int, difficulty: str, max_attempts: int = 200) -> Problem:
    if difficulty not in LEVELS:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose from {', '.join(LEVELS)} or mixed")
    level = LEVELS[difficulty]
    rng = random.Random(f"fol:{seed}:{index}:{difficulty}")
    target = rng.choice(list(Truth))
    depth = rng.choice(level["depths"])
    for attempt in range(max_attempts):
        th, ents, query = _draft(rng, level, depth, target)
        try:
            known = reason(th, ents)
        except Inconsistent:
            continue
        answer, got_depth = _answer(known, query)
        if answer != target or (answer != Truth.UNKNOWN and got_depth != depth):
            continue
        items, q_text, q_formal = _render(th, ents, query, rng, shuffle=difficulty != "easy")
        premises = [f for _, f in items]
        checked, consistent = entails([parse_formula(p) for p in premises], parse_formula(q_formal))
        if not consistent or checked != answer:
            continue  # the reasoner and z3 disagree (or z3 timed out): never ship such a problem
        context = " ".join(t for t, _ in items)
        question = f"{context}\nIs the following statement True, False, or Unknown? {q_text}"
        solution = [
            'Reasoning(reasoning="I state each premise in logic, then ask the prover about the statement.")',
            *[f'Premise(statement="{p}")' for p in premises],
            f'Prove(statement="{q_formal}")',
            f'Answer(value="{answer.value}")',
            "Stop()",
        ]
        return Problem(
            id=f"fol-{seed}-{index:05d}",
            task="fol",
            question=question,
            answer=answer.value,
            toolset="fol",
            source="fol",
            meta={
                "difficulty": difficulty,
                "depth": depth,
                "premises": premises,
                "query": q_formal,
                "verified": "z3",
                "attempts": attempt + 1,
                "solution": solution,
            },
        )
    raise RuntimeError(f"could not generate a {difficulty} FOL problem (seed {seed}, index {index})")


@PROBLEM_SOURCES.register("fol")
def fol_problems(n: int = 100, seed: int = 0, difficulty: str = "mixed") -> Iterator[Problem]:
    """``n`` z3-verified FOL problems. Problem ``i`` depends only on (seed, i, difficulty): sets nest."""
    levels = list(LEVELS) if difficulty == "mixed" else [difficulty]
    for i in range(n):
        yield generate_fol_problem(seed, i, levels[i % len(levels)])
