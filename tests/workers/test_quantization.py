"""8-bit and 4-bit bases through bitsandbytes, which runs on the CPU too: the quantized
path really runs quantized, and shapes it cannot handle fail with the reason."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.settings import Settings
from tests import tiny_models
from tests.api.test_extractions import direct_reference, download
from tests.api.test_jobs import run_queued_jobs
from tests.api.test_models import register

TEXTS = ["The city of Paris is in France.", "Fifty-one is larger than forty-nine."]


def cpu_has_avx512_bf16() -> bool:
    return "avx512_bf16" in Path("/proc/cpuinfo").read_text()


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shaped as bitsandbytes' 4-bit CPU kernels need: every output size a multiple of 32."""
    return tiny_models.save_tiny_llama(tmp_path_factory.mktemp("wide") / "llama", hidden_size=64, heads=2, kv_heads=1)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_a_quantized_base_extracts_close_to_but_not_equal_to_full_precision(
    api: Any, settings: Settings, wide_llama: Path, quantization: str
) -> None:
    model = register(api, wide_llama, quantization=quantization).json()
    full = register(api, wide_llama).json()
    response = api.post("/v1/extractions", json={"model": model["id"], "layers": [1, 2], "texts": TEXTS})
    run_queued_jobs(settings)
    check = api.get(f"/v1/jobs/{model['check_job_id']}").json()
    job = api.get(f"/v1/jobs/{response.json()['job']['id']}").json()
    assert check["status"] == "succeeded" and job["status"] == "succeeded", (check["error"], job["error"])
    assert (
        check["result"]["memory_footprint_bytes"]
        < 0.6 * api.get(f"/v1/models/{full['id']}").json()["memory_footprint_bytes"]
    )
    got = download(api, response.json()["extraction"]["id"])
    reference = direct_reference(wide_llama, TEXTS, [1, 2])
    assert not np.allclose(got, reference, atol=1e-6), "a quantized run must not be full precision"
    relative_error = np.linalg.norm(got - reference) / np.linalg.norm(reference)
    assert relative_error < (0.05 if quantization == "8bit" else 0.5)


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the 4-bit shape limit applies to CPUs with AVX512-BF16")
def test_a_shape_4bit_cannot_run_fails_the_check_with_the_reason(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    model = register(api, tiny_llama, quantization="4bit").json()
    run_queued_jobs(settings)
    job = api.get(f"/v1/jobs/{model['check_job_id']}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "quantization_unsupported"
    assert "multiple of 32" in job["error"]["message"]
    assert api.get(f"/v1/models/{model['id']}").json()["status"] == "failed"
