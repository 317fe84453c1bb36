"""Seeded generator of GSM8K-style arithmetic word problems (1-4 steps, exact integer answers).

The offline default cannot ship GSM8K, so this source writes problems in its spirit: short stories with
people, things and money, several templates per step and varied wording. Every problem carries the
call-by-call solution in ``meta['solution']`` (used for few-shot demonstrations and tests).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from fcdpo.problems.base import PROBLEM_SOURCES, Problem

PEOPLE = [
    ("Maria", "she", "her"), ("James", "he", "his"), ("Aisha", "she", "her"), ("Tom", "he", "his"),
    ("Lena", "she", "her"), ("Ravi", "he", "his"), ("Sofia", "she", "her"), ("Ken", "he", "his"),
    ("Olga", "she", "her"), ("Pedro", "he", "his"), ("Grace", "she", "her"), ("Omar", "he", "his"),
]  # fmt: skip
FRIENDS = ["a friend", "{poss} brother", "{poss} sister", "a neighbour", "a classmate", "{poss} cousin"]
THINGS = [
    ("apples", "basket"), ("stickers", "album"), ("marbles", "jar"), ("cookies", "box"),
    ("books", "shelf"), ("pencils", "case"), ("shells", "bucket"), ("cards", "deck"),
    ("eggs", "carton"), ("stamps", "folder"),
]  # fmt: skip
OPS = {"add": "Add", "sub": "Subtract", "mul": "Multiply", "div": "Divide"}


def _start(rng: random.Random, who: str, thing: str, place: str, n: int) -> str:
    return rng.choice(
        [
            f"{who} has {n} {thing}.",
            f"There are {n} {thing} in {who}'s {place}.",
            f"{who} collected {n} {thing} last week.",
            f"{who} starts the day with {n} {thing}.",
        ]
    )


def _step(rng: random.Random, op: str, k: int, pron: str, poss: str, thing: str, place: str) -> str:
    P = pron.capitalize()
    friend = rng.choice(FRIENDS).format(poss=poss)
    if op == "add":
        return rng.choice(
            [
                f"{P} buys {k} more {thing}.",
                f"Then {pron} gets {k} {thing} from {friend}.",
                f"{P} finds another {k} {thing}.",
                f"The next day {pron} adds {k} {thing} to {poss} {place}.",
            ]
        )
    if op == "sub":
        return rng.choice(
            [
                f"{P} gives {k} {thing} to {friend}.",
                f"{P} loses {k} of them.",
                f"Then {pron} sells {k} {thing}.",
                f"{P} takes {k} {thing} out of {poss} {place} and gives them away.",
            ]
        )
    if op == "mul":
        word = {2: "doubles", 3: "triples"}.get(k)
        choices = [f"Then {pron} ends up with {k} times as many {thing} as before."]
        if word:
            choices.append(f"Then {pron} {word} the number of {thing} {pron} has.")
        return rng.choice(choices)
    return rng.choice(
        [
            f"{P} splits the {thing} into {k} equal groups and keeps one group.",
            f"{P} shares the {thing} equally with {k - 1} friends, keeping one share."
            if k > 2
            else f"{P} shares the {thing} equally with a friend, keeping half.",
        ]
    )


def generate_arith_problem(seed: int, index: int, steps: int | None = None) -> Problem:
    rng = random.Random(f"arith:{seed}:{index}")
    n_steps = steps if steps is not None else rng.randint(1, 4)
    if not 1 <= n_steps <= 4:
        raise ValueError(f"steps must be 1-4, got {n_steps}")
    who, pron, poss = rng.choice(PEOPLE)
    thing, place = rng.choice(THINGS)
    value = rng.randint(5, 60)
    sentences = [_start(rng, who, thing, place, value)]
    solution = ['Reasoning(reasoning="I follow the story one step at a time.")']
    money = n_steps >= 2 and rng.random() < 0.3  # last step: a price per item
    for i in range(n_steps):
        if money and i == n_steps - 1:
            price = rng.randint(2, 9)
            sentences.append(
                rng.choice(
                    [
                        f"Each of the {thing} sells for ${price}. How much money, in dollars, are {poss} {thing} worth?",
                        f"{who} sells all of them for ${price} each. How many dollars does {pron} get?",
                    ]
                )
            )
            solution.append(f"Multiply(a={value}, b={price})")
            value *= price
            break
        ops = ["add", "sub", "mul", "div"]
        weights = [3, 3 if value > 3 else 0, 2 if value <= 200 else 0, 2]
        op = rng.choices(ops, weights)[0]
        if op == "div":
            divisors = [d for d in range(2, 7) if value % d == 0]
            if not divisors:
                op = "add"
        if op == "add":
            k = rng.randint(2, 30)
            new = value + k
        elif op == "sub":
            k = rng.randint(1, max(1, value - 1))
            new = value - k
        elif op == "mul":
            k = rng.choice([2, 2, 3, 4, 5])
            new = value * k
        else:
            k = rng.choice(divisors)
            new = value // k
        sentences.append(_step(rng, op, k, pron, poss, thing, place))
        solution.append(f"{OPS[op]}(a={value}, b={k})")
        value = new
    if not money:
        sentences.append(
            rng.choice(
                [
                    f"How many {thing} does {who} have now?",
                    f"How many {thing} does {pron} have in the end?",
                    f"How many {thing} are left with {who}?",
                ]
            )
        )
    solution += [f"Answer(value={value})", "Stop()"]
    return Problem(
        id=f"arith-{seed}-{index:05d}",
        task="arith",
        question=" ".join(sentences),
        answer=str(value),
        toolset="arithmetic",
        source="arith",
        meta={"steps": n_steps, "solution": solution},
    )


@PROBLEM_SOURCES.register("arith")
def arith_problems(n: int = 100, seed: int = 0, steps: int | None = None) -> Iterator[Problem]:
    """``n`` GSM8K-style problems; ``steps`` fixes the number of operations (default: 1-4 at random)."""
    for i in range(n):
        yield generate_arith_problem(seed, i, steps)
