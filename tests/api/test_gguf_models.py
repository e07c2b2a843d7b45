"""GGUF files as model sources: what the gateway reads from the header and refuses, and the
real SmolLM2-135M-Instruct file checked, extracted and cached by a worker."""

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.inputs.gguf import read_header
from app.inputs.gguf_architectures import TRANSFORMERS_GGUF_ARCHITECTURES
from app.settings import Settings
from tests.api.test_extractions import download, extract, finished
from tests.api.test_models import register
from tests.api.test_probes import shared_rows, train, upload_rows
from tests.conftest import Stack, wait_for_job
from tests.test_gguf import LLAMA_PAIRS, gguf_file, string_pair, u32_pair

TEXTS = [
    "The city of Paris is in France.",
    "Tokyo is the capital of Japan, and one of the largest cities in the world.",
    "Fifty-one is larger than forty-nine.",
    "Yes",
]


def refusal(response: Any, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.json()
    error: dict[str, Any] = response.json()["error"]
    assert error["details"]["field"] == "source", error
    return error


def test_registering_the_smollm2_gguf_file_reads_its_shape_and_sha256_from_the_file(
    api: Any,
    smollm2_gguf: Path,
) -> None:
    response = register(api, smollm2_gguf)
    assert response.status_code == 201, response.json()
    model = response.json()
    assert (model["source_kind"], model["architecture"], model["model_type"]) == ("gguf", "llama", "llama")
    assert (model["num_layers"], model["hidden_size"]) == (30, 576)
    assert model["fingerprint"] == hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert model["resolved_path"] == str(smollm2_gguf.resolve())
    assert register(api, smollm2_gguf).status_code == 200  # the same file again: the same model


def test_a_gguf_file_cut_short_is_a_422_naming_the_problem(api: Any, smollm2_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as file:
        cut.write_bytes(file.read(read_header(smollm2_gguf).size // 2))
    error = refusal(register(api, cut))
    assert "truncated" in error["message"] and error["details"]["gguf_key"]
    assert api.get("/v1/models").json()["items"] == []


def test_a_file_that_is_not_gguf_is_a_422_saying_so(api: Any, tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a GGUF file at all")
    error = refusal(register(api, fake))
    assert "not a GGUF file" in error["message"]


def test_an_architecture_transformers_cannot_load_is_a_422_naming_it_and_the_supported_ones(
    api: Any, tmp_path: Path
) -> None:
    path = tmp_path / "rwkv.gguf"
    pairs = [string_pair("general.architecture", "rwkv6"), u32_pair("rwkv6.block_count", 24)]
    path.write_bytes(gguf_file([*pairs, u32_pair("rwkv6.embedding_length", 2048)]))
    error = refusal(register(api, path))
    assert "'rwkv6'" in error["message"] and "llama" in error["message"]
    assert error["details"]["architecture"] == "rwkv6"
    assert error["details"]["supported"] == sorted(TRANSFORMERS_GGUF_ARCHITECTURES)


def test_a_gguf_header_over_the_size_bounds_is_a_422_naming_the_key(api: Any, tmp_path: Path) -> None:
    path = tmp_path / "huge.gguf"
    pairs = [string_pair("general.architecture", "llama"), u32_pair("llama.block_count", 100_000)]
    path.write_bytes(gguf_file([*pairs, u32_pair("llama.embedding_length", 16)]))
    error = refusal(register(api, path))
    assert error["details"]["config_key"] == "num_hidden_layers" and "GGUF header" in error["message"]


def test_a_fifo_as_gguf_source_is_a_prompt_422(api: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    assert "not a folder or a GGUF file" in refusal(register(api, fifo))["message"]


def test_a_gguf_file_with_a_revision_is_refused(api: Any, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(gguf_file(LLAMA_PAIRS))
    response = register(api, path, revision="main")
    assert response.status_code == 422 and response.json()["error"]["details"]["field"] == "revision"


def test_with_model_roots_a_gguf_file_outside_them_is_a_403(settings: Settings, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    inside = tmp_path / "models"
    inside.mkdir()
    (inside / "tiny.gguf").write_bytes(gguf_file(LLAMA_PAIRS))
    (tmp_path / "outside.gguf").write_bytes(gguf_file(LLAMA_PAIRS))
    with TestClient(create_app(settings.model_copy(update={"model_roots": [inside]}))) as api:
        assert register(api, inside / "tiny.gguf").status_code == 201
        for outside in (tmp_path / "outside.gguf", tmp_path / "missing.gguf"):
            assert "MODEL_ROOTS" in refusal(register(api, outside), 403)["message"]


# --- the real model on a worker -----------------------------------------------------------


def direct_reference(model: Any, tokenizer: Any, texts: list[str], layers: list[int]) -> np.ndarray:
    """Each text alone through the GGUF-loaded model, its last token's hidden states; the
    last layer taken before the final norm (a hook on the last block)."""
    kept: dict[str, torch.Tensor] = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda _module, _inputs, output: kept.update(last=output[0] if isinstance(output, tuple) else output)
    )
    rows = []
    try:
        with torch.inference_mode():
            for text in texts:
                hidden_states = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states
                states = [*hidden_states[:-1], kept["last"]]
                rows.append([states[layer][0, -1].numpy() for layer in layers])
    finally:
        hook.remove()
    return np.array(rows, dtype=np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_the_smollm2_gguf_file_is_checked_and_extracted_like_a_direct_forward_of_the_gguf_model(
    stack: Stack,
    smollm2_gguf: Path,
    smollm2_gguf_model: Any,
) -> None:
    from transformers import AutoTokenizer

    model = register(stack.client, smollm2_gguf).json()
    check = wait_for_job(stack.client, model["check_job_id"], timeout=600)
    assert check["status"] == "succeeded", check["error"]
    assert (check["result"]["num_layers"], check["result"]["hidden_size"]) == (30, 576)
    assert stack.client.get(f"/v1/models/{model['id']}").json()["status"] == "ready"
    entry = stack.settings.resolved_gguf_cache_dir / f"{model['fingerprint']}-float32"
    assert (entry / "model.safetensors").is_file()

    layers = [0, 15, 30]
    batched = finished(stack.client, extract(stack.client, model["id"], texts=TEXTS, layers=layers))
    got_batched = download(stack.client, batched["result"]["extraction_id"])
    # each text alone (another max_length is another cache space, so they are computed again)
    got_alone = np.concatenate(
        [
            download(
                stack.client,
                finished(stack.client, extract(stack.client, model["id"], texts=[t], layers=layers, max_length=4096))[
                    "result"
                ]["extraction_id"],
            )
            for t in TEXTS
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    expected = direct_reference(smollm2_gguf_model, tokenizer, TEXTS, layers)
    assert got_batched.shape == (len(TEXTS), 3, 576)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got_alone, expected, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(got_batched, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_smollm2_chat_states_equal_a_direct_forward_of_its_chat_template(
    stack: Stack, smollm2_gguf: Path, smollm2_gguf_model: Any
) -> None:
    from transformers import AutoTokenizer

    model = register(stack.client, smollm2_gguf).json()
    assert model["has_chat_template"] is True  # read from the GGUF header
    layers = [0, 15, 30]
    response = extract(stack.client, model["id"], texts=TEXTS, layers=layers, prompt_format="chat")
    got = download(stack.client, finished(stack.client, response)["result"]["extraction_id"])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    chats = [
        str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        )
        for text in TEXTS
    ]
    assert all(chat.endswith("<|im_start|>assistant\n") for chat in chats)
    expected = direct_reference(smollm2_gguf_model, _without_special_tokens(tokenizer), chats, layers)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _without_special_tokens(tokenizer: Any) -> Any:
    """The tokenizer, called as `apply_chat_template(tokenize=True)` calls it on the rendered chat."""
    return lambda text, **options: tokenizer(text, add_special_tokens=False, **options)


CITY_STATEMENTS = 400


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a_probe_on_smollm2_reads_the_truth_of_city_statements_and_not_shuffled_labels(
    stack: Stack, smollm2_gguf: Path
) -> None:
    rows = random.Random(7).sample(shared_rows("geometry_of_truth/cities.jsonl"), CITY_STATEMENTS)
    shuffled_labels = [row["label"] for row in rows]
    random.Random(8).shuffle(shuffled_labels)
    model = register(stack.client, smollm2_gguf).json()
    body = {"model": model["id"], "layers": [12], "seed": 0, "baselines": False}  # P(True): tested elsewhere

    true = upload_rows(stack.client, rows, "cities-400")
    run = train(stack.client, dataset=true["id"], **body)
    probe = run["probes"][0]
    assert run["baselines"] is False
    report = stack.client.get(f"/v1/probes/{probe['id']}/report").json()
    assert report["baselines"] == {} and report["versus_baselines"] == {}
    low, high = probe["metrics"]["auroc"]["interval"]
    assert low > 0.75, probe["metrics"]["auroc"]

    # the same texts (their states come from the cache) with the labels shuffled: nothing to read
    shuffled = upload_rows(
        stack.client,
        [{"text": row["text"], "label": label} for row, label in zip(rows, shuffled_labels, strict=True)],
        "cities-shuffled",
    )
    chance = train(stack.client, dataset=shuffled["id"], **body)["probes"][0]
    low, high = chance["metrics"]["auroc"]["interval"]
    assert low < 0.5 < high, chance["metrics"]["auroc"]
