"""Prompt formats through the service: checked in the gateway with the model and the data,
recorded on what they made, applied by the worker exactly as a direct computation does, and
kept apart in the content cache."""

import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from tests import tiny_models
from tests.api.test_extractions import download, extract, finished
from tests.api.test_models import register
from tests.api.test_probes import shared_rows, train, upload_rows
from tests.conftest import Stack

TEXTS = ["The city of Paris is in France.", "The city of Tokyo is in Japan.", "Tokyo"]
QUESTIONS = [
    {"question": "Where is Lyon?", "choices": ["France", "Peru", "Japan"], "answer": 0},
    {"question": "Where is Osaka?", "choices": ["Chile", "Japan"], "answer": 1},
]


@pytest.fixture(scope="module")
def chat_llama_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "chat-llama"
    return tiny_models.save_tiny_llama(folder, seed=5, chat_template=tiny_models.CHAT_TEMPLATE)


@pytest.fixture
def chat_llama(chat_llama_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(chat_llama_template, tmp_path / "chat-llama"))


def direct_states(folder: Path, token_ids: list[list[int]], layers: list[int]) -> np.ndarray:
    """The last token's hidden state at each layer, one text at a time, the final norm taken out."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    model.model.norm = torch.nn.Identity()
    with torch.inference_mode():
        return np.array(
            [
                [
                    model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0, -1].numpy()
                    for layer in layers
                ]
                for ids in token_ids
            ],
            dtype=np.float32,
        )


def refusal(response: Any) -> str:
    assert response.status_code == 422, response.json()
    assert response.json()["error"]["details"]["field"] == "prompt_format", response.json()
    return str(response.json()["error"]["message"])


def test_registration_says_whether_the_tokenizer_has_a_chat_template(
    api: Any, tiny_llama: Path, chat_llama: Path
) -> None:
    assert register(api, tiny_llama).json()["has_chat_template"] is False
    assert register(api, chat_llama).json()["has_chat_template"] is True


def test_chat_states_equal_a_direct_forward_of_the_chat_template_and_are_cached_apart_from_raw(
    stack: Stack, chat_llama: Path
) -> None:
    from transformers import AutoTokenizer

    model = register(stack.client, chat_llama).json()
    chat = extract(stack.client, model["id"], texts=TEXTS, layers=[0, 1, 2], prompt_format="chat")
    assert finished(stack.client, chat)["result"]["cache_hits"] == 0
    extraction = stack.client.get(f"/v1/extractions/{chat.json()['extraction']['id']}").json()
    assert extraction["prompt_format"] == "chat"

    tokenizer = AutoTokenizer.from_pretrained(chat_llama)
    token_ids = [
        cast(Any, tokenizer.apply_chat_template)(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for text in TEXTS
    ]
    expected = direct_states(chat_llama, token_ids, [0, 1, 2])
    states = download(stack.client, extraction["id"])
    np.testing.assert_allclose(states, expected, atol=1e-5)

    # the same texts raw: other inputs, so no hit on the chat entries, and other states
    raw = extract(stack.client, model["id"], texts=TEXTS, layers=[0, 1, 2])
    assert finished(stack.client, raw)["result"]["cache_hits"] == 0
    assert stack.client.get(f"/v1/extractions/{raw.json()['extraction']['id']}").json()["prompt_format"] == "raw"
    assert not np.allclose(download(stack.client, raw.json()["extraction"]["id"]), states, atol=1e-3)
    # and chat again: every text from the cache
    again = extract(stack.client, model["id"], texts=TEXTS, layers=[0, 1, 2], prompt_format="chat")
    assert finished(stack.client, again)["result"]["cache_hits"] == len(TEXTS)


def test_a_template_is_filled_per_text_and_tokenized_as_raw_text_is(stack: Stack, tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    model = register(stack.client, tiny_llama).json()
    template = "Claim: {text} Is it true?"
    response = extract(stack.client, model["id"], texts=TEXTS, layers=[1, 2], prompt_format=template)
    finished(stack.client, response)
    extraction = stack.client.get(f"/v1/extractions/{response.json()['extraction']['id']}").json()
    assert extraction["prompt_format"] == template
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    token_ids = [tokenizer(f"Claim: {text} Is it true?")["input_ids"] for text in TEXTS]
    np.testing.assert_allclose(
        download(stack.client, extraction["id"]), direct_states(tiny_llama, token_ids, [1, 2]), atol=1e-5
    )


def test_chat_on_a_model_without_a_chat_template_is_a_422_naming_the_model(api: Any, tiny_llama: Path) -> None:
    model = register(api, tiny_llama).json()
    message = refusal(extract(api, model["id"], texts=TEXTS, prompt_format="chat"))
    assert model["id"] in message and "no" in message and "chat template" in message
    assert api.get("/v1/extractions").json()["items"] == []


def test_a_template_that_does_not_fit_the_data_is_a_422_naming_the_field(api: Any, tiny_llama: Path) -> None:
    model = register(api, tiny_llama).json()
    assert "{query}" in refusal(extract(api, model["id"], texts=TEXTS, prompt_format="Q: {query}"))
    statements = upload_rows(api, shared_rows("geometry_of_truth/cities.jsonl", 20), "cities-20")
    questions = upload_rows(api, QUESTIONS, "questions")
    # a statements dataset has no question; a multiple-choice one has no single text
    assert "{question}" in refusal(extract(api, model["id"], dataset=statements["id"], prompt_format="{question}"))
    probe = api.post(
        "/v1/probes", json={"model": model["id"], "dataset": questions["id"], "layers": [1], "prompt_format": "{text}"}
    )
    assert "{text}" in refusal(probe)
    comparison = api.post(
        "/v1/comparisons",
        json={
            "model": model["id"],
            "adapters": ["adp_x"],
            "dataset": statements["id"],
            "layers": [1],
            "prompt_format": "{}",
        },
    )
    assert "positional" in refusal(comparison)


def test_a_probe_records_its_prompt_format_and_scores_under_it_unless_told_otherwise(
    stack: Stack, chat_llama: Path
) -> None:
    model = register(stack.client, chat_llama).json()
    dataset = upload_rows(stack.client, shared_rows("geometry_of_truth/cities.jsonl", 60), "cities-60")
    run = train(stack.client, model=model["id"], dataset=dataset["id"], layers=[1], prompt_format="chat")
    assert run["prompt_format"] == "chat"
    assert all(probe["prompt_format"] == "chat" for probe in run["probes"])
    page = stack.client.get(f"/v1/probes/{run['best_probe_id']}/report.html").text
    assert "prompt format: chat" in page

    def score(**body: Any) -> list[float]:
        response = stack.client.post(f"/v1/probes/{run['best_probe_id']}/score", json={"texts": TEXTS, **body})
        assert response.status_code == 200, response.json()
        return list(response.json()["confidences"])

    by_default = score()
    assert by_default == pytest.approx(score(prompt_format="chat"), abs=1e-6)
    assert by_default != pytest.approx(score(prompt_format="raw"), abs=1e-6)
