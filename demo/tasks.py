"""The demo tasks: small, generated data where an adapter visibly changes the output.

- json (json-prompt: prompt tuning; json-lora: LoRA): a sentence about a person
  -> {"name": ..., "age": ..., "city": ...}
- date (date-prefix: prefix tuning; date-ia3: IA3): a date written out in English -> ISO 8601 (YYYY-MM-DD)

Plain Python (no torch): the evaluation runs on the prefixport runtime alone.
"""

from __future__ import annotations

import json
import random

NAMES = ["Alice", "Bob", "Chen", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam",
         "Maya", "Nikos", "Olga", "Pablo", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Ximena",
         "Yusuf", "Zoe", "Arjun", "Bianca", "Carlos", "Dana"]
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Tokyo", "Cairo", "Quito", "Rome", "Delhi", "Austin", "Porto", "Seoul",
          "Dublin", "Nairobi", "Hanoi", "Zurich", "Denver", "Kyiv", "Perth", "Bogota"]
SENTENCES = ["{name} is {age} years old and lives in {city}.", "Meet {name}, {age}, from {city}.",
             "{name} ({age}) moved to {city} last year.", "In {city}, {name} just turned {age}.",
             "My neighbour {name} is {age}; she grew up in {city}.", "{name}, aged {age}, works in {city}."]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DATE_FORMS = ["{month} {day}, {year}", "{day} {month} {year}", "the {day}th of {month}, {year}",
              "{month} {day} {year}"]

PROMPTS = {"json": "Text: {text}\nJSON:", "date": "Date: {text}\nISO:"}
# How train_adapters.py formats a prompt: as it is (no chat template), so every demo adapter is
# converted with `prefixport adapter convert ... --prompt-format raw` and a chat request sends them its text.
PROMPT_FORMAT = "raw"
HELD_OUT_NAMES = set(NAMES[-6:])  # the test split uses people the training split never saw


def json_examples(rng: random.Random, n: int, test: bool) -> list[dict]:
    names = [x for x in NAMES if (x in HELD_OUT_NAMES) == test]
    out = []
    for _ in range(n):
        name, city, age = rng.choice(names), rng.choice(CITIES), rng.randint(18, 90)
        text = rng.choice(SENTENCES).format(name=name, age=age, city=city)
        target = json.dumps({"name": name, "age": age, "city": city})
        out.append({"prompt": PROMPTS["json"].format(text=text), "target": " " + target})
    return out


def date_examples(rng: random.Random, n: int, test: bool) -> list[dict]:
    out = []
    for _ in range(n):
        year = rng.randint(2000, 2009) if test else rng.choice([y for y in range(1950, 2030) if not 2000 <= y <= 2009])
        month, day = rng.randint(1, 12), rng.randint(1, 28)
        text = rng.choice(DATE_FORMS).format(month=MONTHS[month - 1], day=day, year=year)
        out.append({"prompt": PROMPTS["date"].format(text=text), "target": f" {year:04d}-{month:02d}-{day:02d}"})
    return out


def split(task: str, n_train: int = 400, n_test: int = 40) -> tuple[list[dict], list[dict]]:
    make = {"json": json_examples, "date": date_examples}[task]
    rng = random.Random(f"{task}-0")
    return make(rng, n_train, test=False), make(rng, n_test, test=True)


def first_line(output: str) -> str:
    """The answer: the first non-empty line of the output."""
    return next((line.strip() for line in output.split("\n") if line.strip()), "")


def correct(task: str, output: str, target: str) -> bool:
    """Exact task answer. json: the JSON value the output starts with (one line or pretty-printed)
    equals the target's; date: the first non-empty line equals the target."""
    if task == "json":
        try:
            value, _ = json.JSONDecoder().raw_decode(output.strip())
        except json.JSONDecodeError:
            return False
        return value == json.loads(target)
    return first_line(output) == target.strip()
