"""Transfer matrices through the service: a probe per training set scored on every test set,
its own set on the test split only; the diagonal equals the probe run of that set and an
off-diagonal cell equals that probe's evaluation on the other set; the heatmap and page
render; bad requests are refused naming the field."""

import json
from typing import Any

import pytest

from tests.api.test_models import register
from tests.api.test_probes import shared_rows, train, upload_rows
from tests.conftest import Stack, wait_for_job

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def test_a_transfer_matrix_agrees_with_probe_runs_and_evaluations_of_the_same_probes(
    stack: Stack, tiny_llama: Any
) -> None:
    client = stack.client
    model = register(client, tiny_llama).json()
    cities = upload_rows(client, shared_rows("geometry_of_truth/cities.jsonl", 100), "cities")
    negated = upload_rows(client, shared_rows("geometry_of_truth/neg_cities.jsonl", 80), "neg_cities")
    claims = upload_rows(client, shared_rows("geometry_of_truth/common_claim_true_false.jsonl", 60), "claims")
    body: dict[str, Any] = {
        "model": model["id"],
        "train": [cities["id"], negated["id"]],
        "test": [cities["id"], negated["id"], claims["id"]],
        "layers": [1, 2],
        "seed": 5,
    }
    response = client.post("/v1/transfers", json=body)
    assert response.status_code == 202, response.json()
    transfer_id = response.json()["transfer"]["id"]
    assert response.headers["Location"] == f"/v1/transfers/{transfer_id}"
    job = wait_for_job(client, response.json()["job"]["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    transfer = client.get(f"/v1/transfers/{transfer_id}").json()
    matrix = transfer["matrix"]
    assert [row["dataset_ids"] for row in matrix["rows"]] == [[cities["id"]], [negated["id"]]]
    assert [(column["rows"], column["n"]) for column in matrix["columns"]] == [("test", 20), ("test", 16), ("all", 60)]
    assert [[cell["n"] for cell in row] for row in matrix["cells"]] == [[20, 16, 60], [20, 16, 60]]
    assert job["result"]["auroc"] == [[cell["metrics"]["auroc"]["value"] for cell in row] for row in matrix["cells"]]

    # the diagonal: the same split, layers and seed in a probe run give the same probe and test numbers
    run = train(client, model=model["id"], dataset=cities["id"], layers=[1, 2], seed=5)
    best = next(probe for probe in run["probes"] if probe["is_best"])
    assert best["layer"] == matrix["rows"][0]["layer"]
    for name in ("auroc", "accuracy", "ece"):
        assert matrix["cells"][0][0]["metrics"][name]["value"] == pytest.approx(best["metrics"][name]["value"])
        assert matrix["cells"][0][0]["metrics"][name]["interval"] == pytest.approx(best["metrics"][name]["interval"])
    # off the diagonal: that probe evaluated on the claims is the cell
    response = client.post(f"/v1/probes/{best['id']}/evaluations", json={"dataset": claims["id"]})
    evaluated = wait_for_job(client, response.json()["job"]["id"], timeout=300)
    evaluation = client.get(f"/v1/evaluations/{evaluated['result']['evaluation_id']}").json()
    assert matrix["cells"][0][2]["metrics"]["auroc"]["value"] == pytest.approx(evaluation["metrics"]["auroc"]["value"])
    assert matrix["cells"][0][2]["auroc_by_layer"][str(best["layer"])] == pytest.approx(
        evaluation["metrics"]["auroc"]["value"]
    )

    svg = client.get(f"/v1/transfers/{transfer_id}/matrix.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml") and "<svg" in svg.text
    assert client.get(f"/v1/transfers/{transfer_id}/matrix.png").content.startswith(b"\x89PNG")
    page = client.get(f"/v1/transfers/{transfer_id}/report.html").text
    assert all(f'id="{table}"' in page for table in ("heatmap", "auroc", "accuracy", "ece", "layers"))
    assert f"{claims['name']} (all, n=60)" in page
    listed = client.get("/v1/transfers", params={"model": model["id"]}).json()
    assert [item["id"] for item in listed["items"]] == [transfer_id] and listed["items"][0]["matrix"] is None

    # one probe on the union of the training sets
    union = client.post("/v1/transfers", json=body | {"union": True, "test": [claims["id"]]})
    union_job = wait_for_job(client, union.json()["job"]["id"], timeout=300)
    assert union_job["status"] == "succeeded", union_job["error"]
    union_matrix = client.get(f"/v1/transfers/{union.json()['transfer']['id']}").json()["matrix"]
    assert union_matrix["rows"][0]["dataset_ids"] == [cities["id"], negated["id"]]
    assert union_matrix["rows"][0]["n_train"] == 60 + 48

    # refused at once, naming the field, nothing queued
    chat = upload_rows(
        client, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}], "chat"
    )
    refusals: list[tuple[dict[str, Any], int, str | None]] = [
        ({"train": [cities["id"], cities["id"]]}, 422, "train"),
        ({"test": [chat["id"]]}, 422, "test"),
        ({"split": {"train": 0.5, "validation": 0.2, "test": 0.2}}, 422, "split"),
        ({"layers": [9]}, 422, "layers"),
        ({"train": []}, 422, "train"),
        ({"test": ["dst_nope"]}, 404, None),
        ({"prompt_format": "Q: {question} {choices}"}, 422, "prompt_format"),
    ]
    for change, status, field in refusals:
        response = client.post("/v1/transfers", json=body | change)
        assert response.status_code == status, (change, response.json())
        if field:
            assert field in json.dumps(response.json()["error"]), (change, response.json())
    assert len(client.get("/v1/transfers").json()["items"]) == 2
    assert client.get("/v1/transfers/trf_nope").status_code == 404
