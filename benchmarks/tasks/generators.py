"""Task generators built on the Python standard library alone, so that every installation makes the same examples.

Each generator draws distinct inputs from a seeded `random.Random` and returns them as BIG-bench-format records
(`{"input", "target"}` for a generated answer, `{"input", "target_scores"}` for multiple choice), so the BIG-bench
reader turns them into prompts exactly as it does BIG-bench's own tasks. The answers come from code here (number
words, Roman numerals, clock times, month names) or from the standard library (`datetime`, `decimal`, and
`unicodedata.ucd_3_2_0`: the Unicode 3.2 tables every Python ships unchanged, where `unicodedata` itself follows
each Python's own Unicode version and would give another Python other examples).
"""

from __future__ import annotations

import datetime
import random
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen".split()
ONES += "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ROMAN = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL")]
ROMAN += [(10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
# (unit, smaller unit, factor): conversions a LoRA can learn as digit shifts, unlike inches to centimetres
METRIC = [("km", "m", 1000), ("kg", "g", 1000), ("L", "mL", 1000), ("m", "cm", 100), ("cm", "mm", 10)]
MONTHS = "January February March April May June July August September October November December".split()
# Unicode general categories as words: six of the most common among named characters
CATEGORIES = {
    "Lu": "uppercase letter",
    "Ll": "lowercase letter",
    "Nd": "decimal digit",
    "Sm": "math symbol",
    "So": "other symbol",
    "Po": "punctuation",
}


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 in English words, American style: 342 -> "three hundred forty-two"."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))


def roman_numeral(n: int) -> str:
    """1 <= n <= 3999 in Roman numerals with subtractive pairs: 1994 -> "MCMXCIV"."""
    parts = []
    for value, letters in ROMAN:
        count, n = divmod(n, value)
        parts.append(letters * count)
    return "".join(parts)


def clock_words(hour: int, minute: int) -> str:
    """A 24-hour time as spoken in British English: (14, 35) -> "twenty-five to three in the afternoon"."""
    part = "at night" if hour < 6 or hour >= 21 else "in the morning" if hour < 12 else "in the afternoon"
    part = "in the evening" if 18 <= hour < 21 else part  # of the time itself: 11:59 is "to twelve in the morning"
    named = (hour + 1) % 24 if minute > 30 else hour
    spoken = 12 if named % 12 == 0 else named % 12
    if minute == 0:
        return f"{number_words(spoken)} o'clock {part}"
    past = minute if minute <= 30 else 60 - minute
    amount = {15: "quarter", 30: "half"}.get(past) or number_words(past) + (" minute" if past == 1 else " minutes")
    if past % 5 == 0 and past not in (15, 30):
        amount = number_words(past)  # "five past", "twenty-five to": no "minutes" on the five-minute marks
    return f"{amount} {'past' if minute <= 30 else 'to'} {number_words(spoken)} {part}"


@dataclass(frozen=True)
class GeneratedTask:
    """One task: its answer format (for the docs and the manifest), the text before every prompt, and a generator
    of `count` distinct records from a seeded `random.Random` (fewer when the task has fewer inputs)."""

    format: str
    prefix: str
    generate: Callable[[random.Random, int], list[dict]]


def _distinct(rng: random.Random, draw: Callable[[], dict], count: int, tries: int = 20) -> list[dict]:
    """Records from `draw` until `count` have distinct inputs (or `tries * count` draws were made)."""
    records: dict[str, dict] = {}
    for _ in range(tries * count):
        record = draw()
        records.setdefault(record["input"], record)
        if len(records) == count:
            break
    return list(records.values())


def _number_words(rng: random.Random, count: int) -> list[dict]:
    def draw() -> dict:
        n = rng.randrange(10 ** rng.randint(2, 5))  # every length alike: 0-99 as often as 10,000-99,999
        return {"input": str(n), "target": number_words(n)}

    return _distinct(rng, draw, count)


def _roman(rng: random.Random, count: int) -> list[dict]:
    def draw() -> dict:
        n = rng.randint(1, 3999)
        return {"input": str(n), "target": roman_numeral(n)}

    return _distinct(rng, draw, count)


def _long_date(rng: random.Random, count: int) -> list[dict]:
    first = datetime.date(1900, 1, 1).toordinal()
    last = datetime.date(2099, 12, 31).toordinal()

    def draw() -> dict:
        day = datetime.date.fromordinal(rng.randint(first, last))
        return {"input": day.isoformat(), "target": f"{day.day} {MONTHS[day.month - 1]} {day.year}"}

    return _distinct(rng, draw, count)


def _metric(rng: random.Random, count: int) -> list[dict]:
    def draw() -> dict:
        unit, smaller, factor = rng.choice(METRIC)
        amount = Decimal(rng.randint(1, 99_999)).scaleb(-rng.randint(0, 3))  # 0.001 to 99,999, up to 3 decimals
        converted = (amount * factor).normalize()
        return {"input": f"{amount} {unit} in {smaller}", "target": f"{converted:f}"}

    return _distinct(rng, draw, count)


def _clock(rng: random.Random, count: int) -> list[dict]:
    def draw() -> dict:
        hour, minute = rng.randrange(24), rng.randrange(60)
        return {"input": f"{hour:02d}:{minute:02d}", "target": clock_words(hour, minute)}

    return _distinct(rng, draw, count)


def _unicode_category(rng: random.Random, count: int) -> list[dict]:
    """Balanced over the categories: each category's named characters, shuffled, dealt in turn."""
    by_category: dict[str, list[str]] = {code: [] for code in CATEGORIES}
    for point in range(0x110000):
        name = unicodedata.ucd_3_2_0.name(chr(point), "")
        code = unicodedata.ucd_3_2_0.category(chr(point))
        if name and code in by_category:
            by_category[code].append(name)
    for names in by_category.values():
        rng.shuffle(names)
    labels = list(CATEGORIES.values())
    records = [
        {"input": names[i], "target_scores": {label: int(label == CATEGORIES[code]) for label in labels}}
        for i in range(max(map(len, by_category.values())))
        for code, names in by_category.items()
        if i < len(names)
    ]
    return records[:count]


TASKS: dict[str, GeneratedTask] = {
    "number_words": GeneratedTask("generated words", "Write the number in English words.", _number_words),
    "roman_numerals": GeneratedTask("generated code", "Write the number in Roman numerals.", _roman),
    "long_date": GeneratedTask("generated date", "Write the date as day, month name and year.", _long_date),
    "metric_conversion": GeneratedTask("generated number", "Convert to the smaller unit.", _metric),
    "clock_time": GeneratedTask("generated clause", "Say the time in words.", _clock),
    "unicode_category": GeneratedTask(
        "multiple choice, 6 options (classification of Unicode character names)",
        "What kind of character has this Unicode name?",
        _unicode_category,
    ),
}


def generate(name: str, seed: int, count: int) -> dict:
    """The task's records in BIG-bench's `task.json` layout, drawn with a seed per task."""
    if name not in TASKS:
        raise ValueError(f"No generated task {name!r}; choose from {', '.join(TASKS)}, or give a --task-file.")
    task = TASKS[name]
    # a classifier's labels are fixed and learned by its expert: listing them in every prompt would make the
    # prompt six times longer, and training and scoring (every option scored against the prompt) as much slower
    return {
        "task_prefix": task.prefix,
        "append_choices_to_input": False,
        "examples": task.generate(random.Random(f"{seed}:{name}"), count),
    }
