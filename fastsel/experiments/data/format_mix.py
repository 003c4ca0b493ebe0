"""The benign fine-tuning mix of `make experiment`, written by fastsel: short tasks whose answers come in two formats.

Four kinds of request (math word problems, classification, extraction from a record, closed QA over a short
passage), every fact invented from word banks (no world knowledge needed, nothing copied from a dataset). Each row
is answered either in a full sentence ("long": worked arithmetic ending "The answer is N.", "The sentiment is
positive: ...") or with the bare value ("terse": "28", "positive", "Denver"); the prompt never says which. This is
the format mismatch the issue asks for: the same kind of request with a terse answer is a high-loss,
high-gradient-norm example for a chat model that answers in sentences (the paper's Table 12).

`build_rows()` is deterministic (seeded `random.Random`); `files/format_mix.jsonl` is its output, and a test
checks that the shipped file equals what `build_rows()` writes today. Regenerate with
``python -m fastsel.experiments.data.format_mix``.

Row schema: id, kind (math | classification | extraction | closed_qa), format (long | terse), instruction,
response, gold (the value the task metric looks for), labels (classification: the allowed labels, else []).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from typing import Any

KINDS = ("math", "classification", "extraction", "closed_qa")
FORMATS = ("long", "terse")
TERSE_SHARE = 1 / 3  # the pilot: one third of the rows answered with the bare value
ROWS_PER_KIND = 80
FILE_NAME = "format_mix.jsonl"

NAMES = ["Mia", "Tom", "Ava", "Liam", "Noah", "Emma", "Lucas", "Zoe", "Omar", "Priya", "Hana", "Diego", "Lena",
         "Kofi", "Ines", "Mateo", "Sara", "Yuki", "Ravi", "Elena", "Jonas", "Amara", "Felix", "Nora", "Samir",
         "Clara", "Tariq", "Maya", "Oscar", "Leila"]
PRONOUNS = {"Mia": "she", "Tom": "he", "Ava": "she", "Liam": "he", "Noah": "he", "Emma": "she", "Lucas": "he",
            "Zoe": "she", "Omar": "he", "Priya": "she", "Hana": "she", "Diego": "he", "Lena": "she", "Kofi": "he",
            "Ines": "she", "Mateo": "he", "Sara": "she", "Yuki": "she", "Ravi": "he", "Elena": "she",
            "Jonas": "he", "Amara": "she", "Felix": "he", "Nora": "she", "Samir": "he", "Clara": "she",
            "Tariq": "he", "Maya": "she", "Oscar": "he", "Leila": "she"}
SURNAMES = ["Reyes", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Haddad", "Kowalski", "Brennan",
            "Varga", "Sato", "Mensah", "Ferreira", "Dubois", "Petrov", "Alvarez"]
THINGS = ["pencils", "stickers", "marbles", "apples", "cards", "stamps", "beads", "cookies", "shells", "buttons"]
CITIES = ["Denver", "Lisbon", "Oslo", "Nairobi", "Osaka", "Lima", "Krakow", "Dublin", "Austin", "Porto", "Seoul",
          "Quito", "Tunis", "Perth", "Bergen", "Leeds"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PRODUCTS = ["blender", "backpack", "desk lamp", "kettle", "phone case", "rain jacket", "coffee grinder",
            "keyboard", "tent", "water bottle", "office chair", "pair of headphones"]
JOBS = ["nurse", "carpenter", "pilot", "librarian", "chemist", "baker", "architect", "translator", "plumber",
        "teacher"]
COMPANIES = ["Brightwave", "Northfield Tools", "Kestrel Labs", "Bluestone", "Orchid Foods", "Vantage Print",
             "Harbor Freight Co", "Silverline"]
SUBJECTS = ["geology", "music", "economics", "botany", "history", "physics", "nursing", "linguistics"]
GOODS = ["cheese", "pottery", "wool", "glassware", "honey", "lace", "cider", "clocks"]
RIVERS = ["Maren", "Tolly", "Ashby", "Kerrow", "Velda", "Osk", "Brannock", "Lune"]
SYLLABLES = ["bar", "wick", "dal", "mor", "ton", "fen", "hal", "stead", "brook", "ley", "ven", "cor", "ash", "thorn"]
POSITIVE = ["works perfectly", "is excellent value", "exceeded my expectations", "is sturdy and well made",
            "arrived early and works great", "is a joy to use every day", "is the best one I have owned"]
NEGATIVE = ["broke after two days", "is a waste of money", "stopped working within a week",
            "feels cheap and flimsy", "arrived damaged and late", "is far too loud to use",
            "is the worst purchase I have made"]
TOPICS = {
    "sports": ["{city} beats rivals 3-1 to reach the cup final", "Veteran striker signs new deal with {city} club",
               "Marathon in {city} draws record number of runners", "{name} wins gold in the 400 metres"],
    "business": ["{company} shares rise after strong quarterly profits", "{company} to open new factory in {city}",
                 "Retail sales in {city} fall for a third month", "{company} announces merger with rival"],
    "science": ["Researchers in {city} discover new species of frog", "Telescope spots water vapour on distant planet",
                "Study finds bees can recognise human faces", "New battery design doubles storage capacity"],
    "weather": ["Heavy snow expected in {city} this weekend", "Heatwave pushes {city} temperatures to new high",
                "Storm warning issued for the coast near {city}", "Floods close roads across {city}"],
}
TOPIC_REASONS = {"sports": "a sporting result", "business": "companies and money", "science": "a research finding",
                 "weather": "the weather"}


def _town(rng: random.Random) -> str:
    return (rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize()


# ---- math: (question, long answer, gold) ------------------------------------------------------------------------

def _math(rng: random.Random) -> tuple[str, str, str, list[str]]:
    name = rng.choice(NAMES)
    he = PRONOUNS[name]
    things = rng.choice(THINGS)
    template = rng.randrange(8)
    if template == 0:
        a, b, c = rng.randint(3, 20), rng.randint(2, 6), rng.randint(4, 12)
        g = a + b * c
        q = f"{name} has {a} {things}. {he.capitalize()} buys {b} packs with {c} {things} in each. " \
            f"How many {things} does {name} have now?"
        long = f"{name} buys {b} x {c} = {b * c} {things}. With the {a} {he} already had, that is " \
               f"{a} + {b * c} = {g}. The answer is {g}."
    elif template == 1:
        p, a, b = rng.randint(2, 9), rng.randint(10, 40), rng.randint(10, 40)
        g = p * (a + b)
        item = rng.choice(["muffins", "tickets", "notebooks", "candles"])
        q = f"A shop sells {item} for ${p} each. It sells {a} on Monday and {b} on Tuesday. " \
            f"How much money does it make on the two days?"
        long = f"It sells {a} + {b} = {a + b} {item}. At ${p} each that is {a + b} x {p} = ${g}. The answer is {g}."
    elif template == 2:
        p, d = rng.randint(5, 30), rng.randint(3, 15)
        q = f"{name} reads {p} pages every day. The book has {p * d} pages. " \
            f"How many days does {he} need to finish it?"
        long = f"{name} needs {p * d} / {p} = {d} days. The answer is {d}."
        g = d
    elif template == 3:
        a, b, c = rng.randint(4, 12), rng.randint(3, 9), rng.randint(1, 3)
        g = a * b + c
        q = f"A box holds {a} {things}. {name} fills {b} boxes and has {c} {things} left over. " \
            f"How many {things} are there in total?"
        long = f"The full boxes hold {a} x {b} = {a * b} {things}. Adding the {c} left over gives " \
               f"{a * b} + {c} = {g}. The answer is {g}."
    elif template == 4:
        b, c = rng.randint(5, 30), rng.randint(5, 30)
        a = b + c + rng.randint(5, 40)
        g = a - b - c
        x, y = rng.sample(["lunch", "a book", "bus fare", "a gift", "groceries", "a movie ticket"], 2)
        q = f"{name} had ${a}. {he.capitalize()} spent ${b} on {x} and ${c} on {y}. How much money is left?"
        long = f"{name} spent {b} + {c} = ${b + c}. {he.capitalize()} has {a} - {b + c} = ${g} left. " \
               f"The answer is {g}."
    elif template == 5:
        v, h = rng.choice([40, 50, 60, 70, 80, 90]), rng.randint(2, 6)
        g = v * h
        q = f"A train travels at {v} km per hour for {h} hours. How many kilometres does it go?"
        long = f"Distance is speed times time: {v} x {h} = {g} km. The answer is {g}."
    elif template == 6:
        groups, size = rng.randint(3, 8), rng.randint(3, 7)
        g = size
        q = f"A class of {groups * size} students is split equally into {groups} groups. " \
            f"How many students are in each group?"
        long = f"Each group has {groups * size} / {groups} = {size} students. The answer is {size}."
    else:
        other = rng.choice([n for n in NAMES if n != name])
        a, b, c = rng.randint(6, 30), rng.randint(2, 9), rng.randint(2, 10)
        g = a + b + c
        q = f"{name} is {a} years old. {other} is {b} years older than {name}. How old will {other} be in " \
            f"{c} years?"
        long = f"{other} is {a} + {b} = {a + b} now. In {c} years {other} will be {a + b} + {c} = {g}. " \
               f"The answer is {g}."
    return q, long, str(g), []


# ---- classification ---------------------------------------------------------------------------------------------

def _classification(rng: random.Random) -> tuple[str, str, str, list[str]]:
    if rng.random() < 0.5:
        product = rng.choice(PRODUCTS)
        label = rng.choice(["positive", "negative"])
        phrase = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        opener = rng.choice(["I bought this last month.", "Ordered it as a gift.", "Second one I have bought.",
                             "Used it on a camping trip."])
        q = f"Is the sentiment of this review positive or negative?\n\nReview: {opener} The {product} {phrase}."
        long = f"The sentiment is {label}: the reviewer says the {product} {phrase}."
        return q, long, label, ["positive", "negative"]
    topic = rng.choice(list(TOPICS))
    headline = rng.choice(TOPICS[topic]).format(city=rng.choice(CITIES), name=rng.choice(NAMES),
                                                 company=rng.choice(COMPANIES))
    q = f"Classify this headline as sports, business, science or weather.\n\nHeadline: {headline}"
    long = f"This headline is about {topic}, since it reports on {TOPIC_REASONS[topic]}."
    return q, long, topic, list(TOPICS)


# ---- extraction -------------------------------------------------------------------------------------------------

def _extraction(rng: random.Random) -> tuple[str, str, str, list[str]]:
    name = f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}"
    record = rng.randrange(3)
    if record == 0:
        c1, c2 = rng.sample(CITIES, 2)
        code = f"{rng.choice('KLMNRTVW')}{rng.choice('ABDEHJ')}{rng.randint(100, 999)}"
        month, day = rng.choice(MONTHS), rng.randint(1, 28)
        text = f"{name} booked flight {code} from {c1} to {c2} on {month} {day}."
        fields = [("departure city", c1, f"The flight leaves from {c1}."),
                  ("destination city", c2, f"The flight goes to {c2}."),
                  ("flight number", code, f"The flight number is {code}."),
                  ("passenger's name", name, f"The passenger is {name}.")]
        kind = "booking"
    elif record == 1:
        order, qty = rng.randint(1000, 9999), rng.randint(2, 12)
        product, city = rng.choice(PRODUCTS), rng.choice(CITIES)
        text = f"Order {order} for {qty} units of the {product} was placed by {name} and shipped to {city}."
        fields = [("order number", str(order), f"The order number is {order}."),
                  ("quantity", str(qty), f"The order is for {qty} units."),
                  ("customer's name", name, f"The order was placed by {name}."),
                  ("shipping city", city, f"The order was shipped to {city}.")]
        kind = "order"
    else:
        job, company = rng.choice(JOBS), rng.choice(COMPANIES)
        ext = rng.randint(100, 999)
        text = f"{name} works as a {job} at {company} and can be reached on extension {ext}."
        fields = [("job title", job, f"{name} works as a {job}."),
                  ("employer", company, f"{name} works at {company}."),
                  ("phone extension", str(ext), f"The extension is {ext}.")]
        kind = "contact"
    field, gold, long = rng.choice(fields)
    q = f"Extract the {field} from this {kind} record.\n\nRecord: {text}"
    return q, long, gold, []


# ---- closed QA --------------------------------------------------------------------------------------------------

def _closed_qa(rng: random.Random) -> tuple[str, str, str, list[str]]:
    if rng.random() < 0.5:
        town, river = _town(rng), rng.choice(RIVERS)
        year, pop, good = rng.randint(1150, 1890), rng.randint(2, 90) * 100, rng.choice(GOODS)
        passage = f"The town of {town} lies on the {river} River. It was founded in {year} and today has about " \
                  f"{pop} inhabitants. It is best known for its {good}."
        qa = [(f"When was {town} founded?", str(year), f"{town} was founded in {year}."),
              (f"Which river does {town} lie on?", river, f"{town} lies on the {river} River."),
              (f"What is {town} best known for?", good, f"{town} is best known for its {good}."),
              (f"About how many people live in {town}?", str(pop), f"About {pop} people live in {town}.")]
    else:
        first, last = rng.choice(NAMES), rng.choice(SURNAMES)
        he = PRONOUNS[first]
        town, year = _town(rng), rng.randint(1920, 1995)
        subject, job, city = rng.choice(SUBJECTS), rng.choice(JOBS), rng.choice(CITIES)
        passage = f"{first} {last} was born in {town} in {year}. {he.capitalize()} studied {subject} and later " \
                  f"worked as a {job} in {city}."
        qa = [(f"Where was {first} {last} born?", town, f"{first} {last} was born in {town}."),
              (f"In which year was {first} {last} born?", str(year), f"{first} {last} was born in {year}."),
              (f"What did {first} {last} study?", subject, f"{first} {last} studied {subject}."),
              (f"In which city did {first} {last} work?", city, f"{first} {last} worked in {city}.")]
    question, gold, long = rng.choice(qa)
    q = f"Read the passage and answer the question.\n\nPassage: {passage}\n\nQuestion: {question}"
    return q, long, gold, []


MAKERS: dict[str, Callable[[random.Random], tuple[str, str, str, list[str]]]] = {
    "math": _math, "classification": _classification, "extraction": _extraction, "closed_qa": _closed_qa}


def build_rows(rows_per_kind: int = ROWS_PER_KIND, seed: int = 0, terse_share: float = TERSE_SHARE
               ) -> list[dict[str, Any]]:
    """The mix: `rows_per_kind` rows of each kind (interleaved), each answered tersely with probability
    `terse_share`; duplicate instructions are redrawn so every row is distinct."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i in range(rows_per_kind):
        for kind in KINDS:
            while True:
                q, long, gold, labels = MAKERS[kind](rng)
                if q not in seen:
                    break
            seen.add(q)
            fmt = "terse" if rng.random() < terse_share else "long"
            rows.append({"id": f"{kind}-{i:03d}", "kind": kind, "format": fmt, "instruction": q,
                         "response": gold if fmt == "terse" else long, "gold": gold, "labels": labels})
    return rows


def render_jsonl(rows: list[dict[str, Any]]) -> str:
    """The rows as JSON Lines (the shipped file's exact text)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def shipped_path() -> str:
    return os.path.join(os.path.dirname(__file__), "files", FILE_NAME)


if __name__ == "__main__":
    with open(shipped_path(), "w") as f:
        f.write(render_jsonl(build_rows()))
    print(f"wrote {shipped_path()}")
