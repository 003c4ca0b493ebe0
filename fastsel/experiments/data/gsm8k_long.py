"""Multi-step word problems at GSM8K's natural length, in GSM8K's schema, written by fastsel (nothing copied).

The shipped `gsm8k_mini.jsonl` holds two- and three-line solutions (~100 SmolLM2 tokens with the chat template);
real GSM8K training rows are longer (about 200 tokens: a ~60-token question, a solution of 3-8 annotated steps).
Costs on a CPU depend on those lengths, so the benchmark's real-length workload uses these rows: each problem
follows one person through 2-4 steps (buying packs, giving some away, selling at a price, saving a share, ...),
the solution states every step with GSM8K's `<<a*b=c>>` annotations (`//`: whole boxes) and ends `#### <answer>`.

`build_rows()` is deterministic (seeded); `files/gsm8k_long.jsonl` is its output (a test checks they are equal).
Regenerate with ``python -m fastsel.experiments.data.gsm8k_long``. Load with
``load_task("gsm8k", <path of gsm8k_long.jsonl>)``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

from fastsel.experiments.data.format_mix import NAMES, PRONOUNS, THINGS, render_jsonl

FILE_NAME = "gsm8k_long.jsonl"
ROWS = 64
STEPS = (2, 4)  # steps per problem, inclusive
Step = Callable[[random.Random, str, str, str, int], tuple[str, str, int]]


def _buy(rng: random.Random, name: str, they: str, things: str, have: int) -> tuple[str, str, int]:
    packs, each = rng.randint(2, 9), rng.randint(3, 15)
    got = packs * each
    return (f"Then {name} buys {packs} packs of {things}, and every pack holds {each} {things}.",
            f"{name} buys {packs} * {each} = <<{packs}*{each}={got}>>{got} {things} in the packs.\n"
            f"Now {they} has {have} + {got} = <<{have}+{got}={have + got}>>{have + got} {things}.", have + got)


def _give(rng: random.Random, name: str, they: str, things: str, have: int) -> tuple[str, str, int]:
    friend = rng.choice([n for n in NAMES if n != name])
    share = next((k for k in rng.sample([2, 3, 4, 5], 4) if have % k == 0), None)
    if share is None:
        return "", "", 0  # no exact share: the step is skipped
    given = have // share
    left = have - given
    return (f"{they.capitalize()} gives one {['', '', 'half', 'third', 'quarter', 'fifth'][share]} of them to "
            f"{friend}.",
            f"{name} gives {friend} {have} / {share} = <<{have}/{share}={given}>>{given} {things}.\n"
            f"So {they} keeps {have} - {given} = <<{have}-{given}={left}>>{left} {things}.", left)


def _double(rng: random.Random, name: str, they: str, things: str, have: int) -> tuple[str, str, int]:
    times = rng.randint(2, 3)
    total = have * times
    return (f"A week later {they} has {times} times as many {things} as at that point.",
            f"Having {times} times as many means {have} * {times} = <<{have}*{times}={total}>>{total} {things}.",
            total)


def _lose(rng: random.Random, name: str, they: str, things: str, have: int) -> tuple[str, str, int]:
    lost = rng.randint(1, max(1, have // 4))
    left = have - lost
    return (f"On the way home {name} loses {lost} {things}.",
            f"After losing {lost}, {name} has {have} - {lost} = <<{have}-{lost}={left}>>{left} {things} left.",
            left)


def _boxes(rng: random.Random, name: str, they: str, things: str, have: int) -> tuple[str, str, int]:
    size = rng.randint(3, 8)
    full, rest = divmod(have, size)
    return (f"{they.capitalize()} puts the {things} into boxes of {size} and keeps only the full boxes, giving "
            f"the leftover {things} to a neighbour.",
            f"{have} {things} fill {have} / {size} = <<{have}//{size}={full}>>{full} full boxes with {rest} left "
            f"over.\nThe full boxes hold {full} * {size} = <<{full}*{size}={full * size}>>{full * size} {things}.",
            full * size)


def _sell(rng: random.Random, name: str, they: str, things: str, have: int) -> tuple[str, str, int]:
    sold = rng.randint(1, max(1, have // 3))
    left = have - sold
    return (f"{name} sells {sold} of the {things} at the school fair.",
            f"Selling {sold} leaves {name} with {have} - {sold} = <<{have}-{sold}={left}>>{left} {things}.", left)


STEP_KINDS: tuple[Step, ...] = (_buy, _give, _double, _lose, _boxes, _sell)


def _problem(rng: random.Random, index: int) -> dict[str, str]:
    name = rng.choice(NAMES)
    they = PRONOUNS[name]
    things = rng.choice(THINGS)
    have = rng.randint(5, 40)
    question = [f"{name} has {have} {things}."]
    answer = []
    for _ in range(rng.randint(*STEPS)):
        step = rng.choice(STEP_KINDS)
        said, worked, after = step(rng, name, they, things, have)
        if after <= 0:
            continue
        question.append(said)
        answer.append(worked)
        have = after
    question.append(f"How many {things} does {name} have at the end?")
    answer.append(f"#### {have}")
    return {"question": " ".join(question), "answer": "\n".join(answer)}


def build_rows(count: int = ROWS, seed: int = 0) -> list[dict[str, str]]:
    """`count` problems in GSM8K's schema (question, answer), deterministic for the seed."""
    rng = random.Random(seed)
    return [_problem(rng, i) for i in range(count)]


def shipped_path() -> str:
    return os.path.join(os.path.dirname(__file__), "files", FILE_NAME)


if __name__ == "__main__":
    with open(shipped_path(), "w") as f:
        f.write(render_jsonl(build_rows()))
