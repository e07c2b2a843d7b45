"""Build a multiple-choice set from the Geometry-of-Truth cities statements: for each distinct
city, "In which country is the city of X?" with its country and three other countries of the
set as choices (drawn so that no country's presence gives the answer away), the gold letter
balanced over A–D (exactly, when the count of cities allows).
Seeded and deterministic: the same source and seed give the same bytes.

    python scripts/build_city_questions.py \\
        --source ../shared/data/geometry_of_truth/cities.csv --output data/city_questions.jsonl

The output is the service's multiple-choice upload format, one compact JSON object a line,
`{"question", "choices", "answer"}` with `answer` the 0-based index of the gold choice:
already normalised, so the uploaded dataset's content is the file itself.
"""

import argparse
import csv
import json
import random
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "geometry_of_truth" / "cities.csv"
DEFAULT_OUTPUT = ROOT / "data" / "city_questions.jsonl"
QUESTION = "In which country is the city of {city}?"
CHOICES = 4


def read_cities(source: Path) -> list[tuple[str, str]]:
    """(city, country) for each distinct city, in the order the file first names it. The
    file states each city twice (once true, once false), always with its `correct_country`."""
    cities: dict[str, str] = {}
    with source.open(newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            city, country = row["city"].strip(), row["correct_country"].strip()
            if cities.setdefault(city, country) != country:
                raise ValueError(f"{city} is in {cities[city]} and in {country}")
    return list(cities.items())


def choice_name(country: str) -> str:
    """A country as a choice stands alone: "the United States" in a sentence, "United States"
    in a list."""
    return country.removeprefix("the ")


def balanced_positions(count: int, rng: random.Random) -> list[int]:
    """`count` gold positions in shuffled order, each position as often as any other, give or
    take one."""
    positions = [index % CHOICES for index in range(count)]
    rng.shuffle(positions)
    return positions


def build_questions(cities: list[tuple[str, str]], seed: int) -> list[dict[str, object]]:
    """One question per city: its country at its balanced position, and three other countries
    drawn in proportion to how many cities of the set each has. A country is then a wrong
    choice about three times as often as it is the right one, whatever its share of cities,
    so seeing a frequent country among the choices does not give the answer away."""
    rng = random.Random(seed)
    cities_in = Counter(country for _, country in cities)
    questions: list[dict[str, object]] = []
    for (city, country), gold in zip(cities, balanced_positions(len(cities), rng), strict=True):
        others = _weighted_sample(
            {other: count for other, count in sorted(cities_in.items()) if other != country}, CHOICES - 1, rng
        )
        choices = [*others[:gold], country, *others[gold:]]
        questions.append(
            {
                "question": QUESTION.format(city=city),
                "choices": [choice_name(choice) for choice in choices],
                "answer": gold,
            }
        )
    return questions


def _weighted_sample(weights: dict[str, int], count: int, rng: random.Random) -> list[str]:
    """`count` distinct keys, each draw in proportion to the weights of those left."""
    left = dict(weights)
    drawn = []
    for _ in range(count):
        key = rng.choices(list(left), weights=list(left.values()))[0]
        drawn.append(key)
        del left[key]
    return drawn


def as_jsonl(questions: list[dict[str, object]]) -> bytes:
    return "".join(
        json.dumps(question, ensure_ascii=False, separators=(",", ":")) + "\n" for question in questions
    ).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the Geometry-of-Truth cities.csv")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    questions = build_questions(read_cities(args.source), args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(as_jsonl(questions))
    print(f"{len(questions)} questions written to {args.output}")


if __name__ == "__main__":
    main()
