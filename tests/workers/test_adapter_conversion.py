"""Tinker checkpoints become PEFT adapters that apply exactly the hand-merged update."""

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import tiny_models
from workers.adapters.convert import base_modules, convert, read_config
from workers.errors import JobFailed

IDS = torch.tensor([[1, 17, 5, 42, 9, 77, 3]])


def converted(tmp_path: Path, base: Path, adapter: Path) -> Path:
    destination = tmp_path / "peft"
    destination.mkdir()
    convert(
        adapter / "adapter_model.safetensors",
        read_config(adapter / "adapter_config.json"),
        base_modules(str(base)),
        destination,
        str(base),
    )
    return destination


def with_peft(base: Path, adapter: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


@pytest.fixture
def untied(tmp_path: Path) -> Path:
    return tiny_models.save_tiny_llama(tmp_path / "untied")


@pytest.fixture
def tied(tmp_path: Path) -> Path:
    return tiny_models.save_tiny_llama(tmp_path / "tied", tied=True)


def test_an_untied_base_gets_the_hand_merged_logits_through_peft(tmp_path: Path, untied: Path) -> None:
    tensors = tiny_models.save_tinker_adapter(tmp_path / "tinker", untied)
    peft_folder = converted(tmp_path, untied, tmp_path / "tinker")
    config = json.loads((peft_folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    }
    with torch.inference_mode():
        got = with_peft(untied, peft_folder)(IDS).logits
        expected = tiny_models.merge_by_hand(untied, tensors)(IDS).logits
        base = tiny_models.merge_by_hand(untied, {})(IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)


def test_on_a_tied_base_the_unembedding_lands_on_the_embedding_and_is_applied(tmp_path: Path, tied: Path) -> None:
    tensors = tiny_models.save_tinker_adapter(tmp_path / "tinker", tied)
    peft_folder = converted(tmp_path, tied, tmp_path / "tinker")
    assert "embed_tokens" in json.loads((peft_folder / "adapter_config.json").read_text())["target_modules"]
    model = with_peft(tied, peft_folder)
    embedding = model.get_base_model().model.embed_tokens
    assert embedding.lora_embedding_A["default"].abs().sum() > 0, "PEFT dropped the unembedding LoRA"
    merged_by_hand = tiny_models.merge_by_hand(tied, tensors)
    with torch.inference_mode():
        hidden = model(IDS, output_hidden_states=True).hidden_states[-1]
        expected_hidden = merged_by_hand(IDS, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(hidden, expected_hidden, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(IDS).logits, merged_by_hand(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("unembed_name", ["model.unembed_tokens", "model.lm_head"])
def test_both_names_of_the_unembedding_convert(tmp_path: Path, untied: Path, unembed_name: str) -> None:
    tensors = tiny_models.save_tinker_adapter(tmp_path / "tinker", untied, unembed_name=unembed_name)
    peft_folder = converted(tmp_path, untied, tmp_path / "tinker")
    with torch.inference_mode():
        torch.testing.assert_close(
            with_peft(untied, peft_folder)(IDS).logits,
            tiny_models.merge_by_hand(untied, tensors)(IDS).logits,
            atol=1e-5,
            rtol=1e-5,
        )


def test_gpt_oss_attention_names_are_renamed(tmp_path: Path, untied: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = tiny_models.save_tinker_adapter(tmp_path / "tinker", untied)
    renamed = {
        name.replace(".self_attn.", ".attn."): value
        for name, value in load_file(tmp_path / "tinker" / "adapter_model.safetensors").items()
    }
    save_file(renamed, str(tmp_path / "tinker" / "adapter_model.safetensors"))
    peft_folder = converted(tmp_path, untied, tmp_path / "tinker")
    with torch.inference_mode():
        torch.testing.assert_close(
            with_peft(untied, peft_folder)(IDS).logits,
            tiny_models.merge_by_hand(untied, tensors)(IDS).logits,
            atol=1e-5,
            rtol=1e-5,
        )


def test_a_peft_adapter_converts_to_itself(tmp_path: Path, untied: Path) -> None:
    tiny_models.save_tinker_adapter(tmp_path / "tinker", untied)
    once = converted(tmp_path, untied, tmp_path / "tinker")
    destination = tmp_path / "again"
    destination.mkdir()
    again = convert(
        once / "adapter_model.safetensors",
        read_config(once / "adapter_config.json"),
        base_modules(str(untied)),
        destination,
        str(untied),
    )
    assert (destination / "adapter_model.safetensors").read_bytes() == (once / "adapter_model.safetensors").read_bytes()
    assert again.sha256 == hashlib.sha256((once / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_an_adapter_for_another_shape_is_refused_naming_the_first_bad_tensors(tmp_path: Path, untied: Path) -> None:
    wider = tiny_models.save_tiny_llama(tmp_path / "wider", hidden_size=32)
    tiny_models.save_tinker_adapter(tmp_path / "tinker", wider)
    with pytest.raises(JobFailed) as failure:
        converted(tmp_path, untied, tmp_path / "tinker")
    assert failure.value.code == "adapter_base_mismatch"
    assert (
        "base_model.model.lm_head" in failure.value.message
        or "base_model.model.model.layers.0" in failure.value.message
    )
    assert failure.value.details["mismatches"]
    assert list((tmp_path / "peft").iterdir()) == []


def test_a_module_the_base_lacks_is_refused(tmp_path: Path, untied: Path) -> None:
    deeper = tiny_models.save_tiny_llama(tmp_path / "deeper", layers=3)
    tiny_models.save_tinker_adapter(tmp_path / "tinker", deeper)
    with pytest.raises(JobFailed, match=r"model\.layers\.2") as failure:
        converted(tmp_path, untied, tmp_path / "tinker")
    assert failure.value.code == "adapter_base_mismatch"


def test_moe_expert_tensors_are_refused_clearly(tmp_path: Path, untied: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "tinker"
    folder.mkdir()
    save_file(
        {"base_model.model.model.layers.0.mlp.experts.w1.lora_A.weight": torch.zeros(8, 4, 16)},
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    with pytest.raises(JobFailed, match="MoE expert") as failure:
        converted(tmp_path, untied, folder)
    assert failure.value.code == "unsupported_adapter"


def test_a_config_without_lora_alpha_is_refused(tmp_path: Path, untied: Path) -> None:
    tiny_models.save_tinker_adapter(tmp_path / "tinker", untied, config={"r": 4})
    with pytest.raises(JobFailed, match="lora_alpha"):
        converted(tmp_path, untied, tmp_path / "tinker")


def test_a_config_whose_rank_disagrees_with_the_tensors_is_refused(tmp_path: Path, untied: Path) -> None:
    tiny_models.save_tinker_adapter(tmp_path / "tinker", untied, config={"r": 8, "lora_alpha": 16})
    with pytest.raises(JobFailed, match="r=8"):
        converted(tmp_path, untied, tmp_path / "tinker")


def test_a_safetensors_header_pointing_past_the_file_is_refused(tmp_path: Path, untied: Path) -> None:
    import struct

    folder = tmp_path / "tinker"
    folder.mkdir()
    header = json.dumps(
        {"base_model.model.lm_head.lora_A.weight": {"dtype": "F32", "shape": [4, 16], "data_offsets": [0, 1 << 40]}}
    ).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    with pytest.raises(JobFailed, match="byte range"):
        converted(tmp_path, untied, folder)
