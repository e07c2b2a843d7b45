"""The committed city questions (`data/city_questions.jsonl`): what the script builds from
the shared cities statements, and a balanced multiple-choice dataset for the service."""

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from app.inputs.datasets import parse_upload
from tests.conftest import ROOT, SHARED_DATA, require

COMMITTED = ROOT / "data" / "city_questions.jsonl"
SOURCE = SHARED_DATA / "geometry_of_truth" / "cities.csv"


def built(tmp_path: Path, seed: int = 0) -> bytes:
    require(SOURCE.is_file(), "the shared data sets are not here")
    output = tmp_path / "city_questions.jsonl"
    command = [sys.executable, "scripts/build_city_questions.py", "--source", str(SOURCE), "--output", str(output)]
    subprocess.run([*command, "--seed", str(seed)], cwd=ROOT, check=True, capture_output=True)
    return output.read_bytes()


def test_the_committed_file_is_exactly_what_the_script_builds(tmp_path: Path) -> None:
    assert built(tmp_path) == COMMITTED.read_bytes()


def test_another_seed_draws_other_questions_as_balanced(tmp_path: Path) -> None:
    other = parse_upload(built(tmp_path, seed=1), "city_questions.jsonl")
    assert other.content != COMMITTED.read_bytes()
    assert other.label_balance == {"0": 187, "1": 187, "2": 187, "3": 187}


def test_the_file_uploads_as_a_multiple_choice_dataset_with_balanced_gold_letters() -> None:
    raw = COMMITTED.read_bytes()
    dataset = parse_upload(raw, "city_questions.jsonl")
    assert dataset.kind == "multiple_choice"
    assert dataset.rows == 748
    assert dataset.label_balance == {"0": 187, "1": 187, "2": 187, "3": 187}
    assert dataset.content == raw  # already normalised: stored byte for byte


def test_every_city_is_asked_once_with_its_own_country_as_gold_among_four_countries() -> None:
    require(SOURCE.is_file(), "the shared data sets are not here")
    with SOURCE.open(newline="", encoding="utf-8") as file:
        country_of = {row["city"]: row["correct_country"].removeprefix("the ") for row in csv.DictReader(file)}
    countries = set(country_of.values())
    rows = [json.loads(line) for line in COMMITTED.read_text(encoding="utf-8").splitlines()]
    cities = [row["question"].removeprefix("In which country is the city of ").removesuffix("?") for row in rows]
    assert sorted(cities) == sorted(country_of)
    for city, row in zip(cities, rows, strict=True):
        assert row["choices"][row["answer"]] == country_of[city]
        assert len(set(row["choices"])) == 4
        assert set(row["choices"]) <= countries


def test_no_country_among_the_choices_gives_the_answer_away() -> None:
    rows = [json.loads(line) for line in COMMITTED.read_text(encoding="utf-8").splitlines()]
    shown: Counter[str] = Counter(choice for row in rows for choice in row["choices"])
    gold: Counter[str] = Counter(row["choices"][row["answer"]] for row in rows)
    often_shown = [country for country, count in shown.items() if count >= 20]
    assert len(often_shown) >= 10
    assert {
        country: round(gold[country] / shown[country], 2)
        for country in often_shown
        if gold[country] / shown[country] > 0.4
    } == {}
