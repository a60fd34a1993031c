"""The serving benchmark's workloads: prompts of exact token lengths made with the server's
tokenizer, and the datasets of `prefixport bench serve` (random, shared-prefix, adapters, file).

A prompt is a run of the tokenizer's own word tokens (" word": one token alone and, after a
space-splitting pre-tokenizer, one token in any sequence), decoded as one text and checked by
encoding it again; where the count is off it is trimmed or extended until it is right. Needs
`tokenizers` alone (a dependency of prefixport)."""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

DATASETS = ("random", "shared-prefix", "adapters", "file")
_WORD = re.compile(r" ?[A-Za-z]{2,}")
_FIX_ROUNDS = 16  # trims or extensions tried before a prompt's length is taken as it is


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: the model (base or adapter) it names, its prompt, the prompt's
    token count by the benchmark's tokenizer and max_tokens."""

    index: int
    model: str
    prompt: str
    input_len: int
    output_len: int


def parse_range(text: str, what: str = "length", minimum: int = 1) -> tuple[int, int]:
    """`N` or `LO:HI` (inclusive) -> (lo, hi); ValueError saying what is wrong."""
    parts = text.strip().split(":")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        low, high = int(parts[0]), int(parts[-1])
    except ValueError:
        raise ValueError(f"{what} {text!r}: give a number N or a range LO:HI, e.g. 100:1000") from None
    if low < minimum:
        raise ValueError(f"{what} {text!r}: must be at least {minimum}")
    if high < low:
        raise ValueError(f"{what} {text!r}: HI ({high}) is below LO ({low})")
    return low, high


def parse_names(text: str) -> tuple[str, ...]:
    """`a,b,c` -> ("a", "b", "c"); ValueError for an empty name."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise ValueError(f"{text!r}: give model names separated by commas, e.g. a,b,c")
    return names


def read_lengths(path: str | Path) -> list[tuple[int, int]]:
    """(input_len, output_len) pairs from a file: JSON lines {"input_len": n, "output_len": m}, or CSV
    rows `input_len,output_len` (a header row optional). ValueError naming the line where it is bad."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    out: list[tuple[int, int]] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if line.startswith("{"):
                row = json.loads(line)
                pair = (row["input_len"], row["output_len"])
            else:
                cells = next(csv.reader([line]))
                if number == 1 and cells and not cells[0].strip().lstrip("-").isdigit():
                    if [c.strip() for c in cells[:2]] != ["input_len", "output_len"]:
                        raise ValueError("a CSV header must be input_len,output_len")
                    continue
                if len(cells) != 2:
                    raise ValueError("a CSV row is input_len,output_len")
                pair = (int(cells[0]), int(cells[1]))
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
                raise ValueError("both lengths must be whole numbers of at least 1")
        except (ValueError, KeyError, TypeError) as e:
            why = f"missing {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{path}, line {number}: {why or 'not a pair of lengths'}: {line[:80]!r}") from None
        out.append((int(pair[0]), int(pair[1])))
    if not out:
        raise ValueError(f"{path} holds no lengths")
    return out


class PromptMaker:
    """Texts of exact token counts by a tokenizer.json (an export folder holding one, or the file)."""

    def __init__(self, tokenizer: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"no tokenizer at {tokenizer}: give an export folder (with tokenizer.json) "
                             "or a tokenizer.json file")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own Exception type
            raise ValueError(f"{path} is not a tokenizer.json: {e}") from None
        self.path = path
        self.words = self._words()

    def _words(self) -> list[int]:
        """Token ids that decode alone to a word (with its leading space where the tokenizer keeps
        one) and encode back to themselves; words with a leading space first (they never merge)."""
        spaced: list[int] = []
        bare: list[int] = []
        for token_id in range(self.tokenizer.get_vocab_size()):
            text = self.tokenizer.decode([token_id])
            if _WORD.fullmatch(text) and self.tokenizer.encode(text, add_special_tokens=False).ids == [token_id]:
                (spaced if text.startswith(" ") else bare).append(token_id)
        words = spaced or bare
        if not words:
            raise ValueError(f"{self.path}: found no word tokens to build prompts from")
        return words

    def count(self, text: str) -> int:
        """Tokens in `text` (no special tokens added)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def ids(self, rng: random.Random, n: int) -> list[int]:
        """n word tokens drawn with `rng`."""
        return rng.choices(self.words, k=n)

    def text(self, rng: random.Random, n: int, prefix: Sequence[int] = ()) -> tuple[str, int]:
        """A text of `prefix` (token ids) then word tokens, n tokens in all: (text, its count), the
        count equal to n unless `_FIX_ROUNDS` corrections could not reach it."""
        tail = self.ids(rng, max(0, n - len(prefix)))
        for _ in range(_FIX_ROUNDS):
            text = self.tokenizer.decode([*prefix, *tail])
            count = self.count(text)
            if count == n:
                break
            if count > n:
                tail = tail[:max(0, len(tail) - (count - n))]
            else:
                tail += self.ids(rng, n - count)
        return text, count


@dataclass(frozen=True)
class Workload:
    """What each sweep point sends: the dataset, its lengths (the same at every point) and the seed
    its texts are drawn from (new texts at each point, so that no point hits another's prompt cache;
    the shared prefix is the same everywhere)."""

    maker: PromptMaker
    dataset: str
    lengths: list[tuple[int, int]]  # (input_len, output_len) per request
    models: list[str]  # cycled through: request i names models[i % len]
    seed: int
    prefix_len: int = 0

    def requests(self, tag: str) -> list[BenchRequest]:
        """The requests of one sweep point (or of the warm-up), texts drawn from seed and `tag`."""
        prefix = self.maker.ids(random.Random(f"{self.seed}:prefix"), self.prefix_len) if self.prefix_len else []
        rng = random.Random(f"{self.seed}:{tag}")
        out = []
        for i, (input_len, output_len) in enumerate(self.lengths):
            text, count = self.maker.text(rng, len(prefix) + input_len, prefix)
            out.append(BenchRequest(i, self.models[i % len(self.models)], text, count, output_len))
        return out


def make_workload(maker: PromptMaker, dataset: str, *, model: str, num_prompts: int | None = None,
                  input_len: tuple[int, int] = (100, 1000), output_len: tuple[int, int] = (64, 64),
                  prefix_len: int = 512, adapters: Sequence[str] = (), lengths_file: str | Path | None = None,
                  seed: int = 0) -> Workload:
    """The workload of a dataset kind (`DATASETS`): lengths drawn uniformly within the ranges with
    `seed` (or read from `lengths_file`, cycled to `num_prompts`), the models to name (`model`, or
    `adapters` in turn), the shared prefix's length. ValueError where the options do not fit."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: one of {', '.join(DATASETS)}")
    if adapters and dataset != "adapters":
        raise ValueError("--adapters goes with --dataset adapters")
    if lengths_file is not None and dataset != "file":
        raise ValueError("--lengths goes with --dataset file")
    if dataset == "adapters" and not adapters:
        raise ValueError("--dataset adapters needs --adapters NAME,NAME,...")
    if dataset == "shared-prefix" and prefix_len < 1:
        raise ValueError("--dataset shared-prefix needs --prefix-len of at least 1")
    rng = random.Random(f"{seed}:lengths")
    if dataset == "file":
        if lengths_file is None:
            raise ValueError("--dataset file needs --lengths FILE")
        rows = read_lengths(lengths_file)
        n = num_prompts or len(rows)
        pairs = [rows[i % len(rows)] for i in range(n)]
    else:
        n = num_prompts or 48
        pairs = [(rng.randint(*input_len), rng.randint(*output_len)) for _ in range(n)]
    if n < 1:
        raise ValueError("--num-prompts must be at least 1")
    return Workload(maker, dataset, pairs, list(adapters) if dataset == "adapters" else [model], seed,
                    prefix_len if dataset == "shared-prefix" else 0)
