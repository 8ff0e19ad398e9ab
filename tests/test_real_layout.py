"""The real Qwen2.5-VL folder layout: convert without copying the base, answer with the
folder's own chat template and processor settings."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from napari_tghmoe.model.hf_layout import QWEN2_5_VL_3B, QWEN_SPECIAL_TOKENS, build_hf_layout_folder, qwen_config_dict
from napari_tghmoe.model.loading import ModelLoadError, load_model

MARKER = "[chat_template.json of the fixture]"
SYSTEM_WITH_MARKER = f"You are a helpful assistant. {MARKER}"
FIXTURE_MEAN = (0.5, 0.4, 0.3)
FIXTURE_STD = (0.2, 0.25, 0.3)
GRID = "8,56,56"  # -> video grid (4, 4, 4) of 14-pixel patches, 16 LLM tokens


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    """Qwen2.5-VL in the Hugging Face layout: sharded bf16 weights, Qwen tokenizer and processor files."""
    return build_hf_layout_folder(
        tmp_path_factory.mktemp("hub") / "Qwen2.5-VL-tiny-Instruct",
        system_prompt=SYSTEM_WITH_MARKER,
        tokenizer_system_prompt="You are a helpful assistant.",  # the tokenizer's copy has no marker
        image_mean=FIXTURE_MEAN,
        image_std=FIXTURE_STD,
    )


@pytest.fixture(scope="module")
def converted(hf_base, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(converted folder, hashes of the base folder's files before converting)."""
    from napari_tghmoe.cli import main

    before = file_hashes(hf_base)
    out = tmp_path_factory.mktemp("models") / "tghmoe-tiny"
    assert main(["convert", "--base", str(hf_base), "--out", str(out), "--volume-grid", GRID]) == 0
    return out, before


@pytest.fixture(scope="module")
def engine(converted):
    from napari_tghmoe.engine import InferenceEngine

    return InferenceEngine.from_pretrained(converted[0], device="cpu")


def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 300, (20, 80, 80)).astype(np.float32)


# ------------------------------------------------------------------ the fixture is the real layout


def test_the_fixture_has_the_files_and_formats_of_the_hub_folder(hf_base):
    from transformers import AutoConfig, AutoTokenizer

    names = {p.name for p in hf_base.iterdir()}
    shards = sorted(n for n in names if n.startswith("model-0000"))
    assert len(shards) >= 2 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert names == set(shards) | {
        "config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
        "merges.txt", "preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
        "generation_config.json",
    }
    index = json.loads((hf_base / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert any(k.startswith("visual.blocks.") for k in index["weight_map"])  # Qwen's checkpoint key layout
    assert any(k.startswith("model.layers.") for k in index["weight_map"])

    raw = json.loads((hf_base / "config.json").read_text())
    assert raw["model_type"] == "qwen2_5_vl" and "text_config" not in raw  # Qwen's flat layout
    assert raw["rope_scaling"]["type"] == "mrope" and raw["vision_config"]["fullatt_block_indexes"] == [1, 3]
    config = AutoConfig.from_pretrained(hf_base, local_files_only=True)
    assert config.text_config.hidden_size == raw["hidden_size"]

    tokenizer = AutoTokenizer.from_pretrained(hf_base, local_files_only=True)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    bpe = len(json.loads((hf_base / "vocab.json").read_text()))
    ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    assert ids == list(range(bpe, bpe + len(QWEN_SPECIAL_TOKENS)))  # after the BPE vocab, in Qwen's order
    assert raw["video_token_id"] == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert tokenizer.decode(tokenizer("The liver, 2 cm.")["input_ids"]) == "The liver, 2 cm."
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"

    processor = json.loads((hf_base / "video_preprocessor_config.json").read_text())
    assert (processor["patch_size"], processor["temporal_patch_size"], processor["merge_size"]) == (14, 2, 2)
    assert MARKER in json.loads((hf_base / "chat_template.json").read_text())["chat_template"]


def test_the_real_3b_dimensions_parse_to_the_3b_model():
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    ids = {k: 151643 + i for i, k in enumerate(
        ["bos_token_id", "pad_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id",
         "vision_token_id", "image_token_id", "video_token_id"])}
    config = AutoConfig.for_model(**qwen_config_dict(QWEN2_5_VL_3B, ids))
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (2048, 36, 16, 2)
    assert (text.intermediate_size, text.vocab_size) == (11008, 151936)
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.window_size) == (32, 1280, 2048, 112)
    assert vision.fullatt_block_indexes == [7, 15, 23, 31]
    assert (vision.patch_size, vision.temporal_patch_size) == (14, 2)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    assert 3.70e9 < sum(p.numel() for p in model.parameters()) < 3.80e9  # "3B": 3.75 B with tied embeddings


# ------------------------------------------------------------------ convert refers to the base


def test_convert_leaves_the_base_untouched_and_copies_none_of_its_weights(hf_base, converted):
    from napari_tghmoe.model.modeling import ADAPTER_KEY

    out, before = converted
    assert file_hashes(hf_base) == before  # byte-identical base folder
    base_weights = {n: h for n, h in before.items() if n.endswith(".safetensors")}
    out_files = {p.name: p for p in out.iterdir()}
    assert not [n for n in out_files if n.startswith("model")]  # no shard, no index
    out_hashes = file_hashes(out)
    assert not set(out_hashes.values()) & set(base_weights.values())  # no copy under another name
    base_sizes = {(hf_base / n).stat().st_size for n in base_weights}
    assert not {p.stat().st_size for p in out_files.values()} & base_sizes
    assert sum(p.stat().st_size for p in out_files.values()) < sum((hf_base / n).stat().st_size for n in base_weights)

    adapter = load_file(out / "tghmoe_adapter.safetensors")
    assert adapter and all(ADAPTER_KEY.search(k) for k in adapter)
    reference = json.loads((out / "tghmoe_base.json").read_text())
    assert Path(reference["base_path"]) == hf_base.resolve()
    assert reference["weight_files"] == {n: (hf_base / n).stat().st_size for n in base_weights}


def test_loading_the_converted_folder_gives_the_base_tensors_bit_identical(hf_base, converted):
    from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration

    out, _ = converted
    model, tokenizer, info = load_model(out, device="cpu", dtype="bf16")  # the shards' own dtype
    assert isinstance(model, TGHMoEForConditionalGeneration) and info.is_tghmoe and not info.adapted_from_base
    assert info.base_path == str(hf_base.resolve()) and len(info.weights_sha256) == 64
    state = {
        k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
        for k, v in model.state_dict().items()
    }
    index = json.loads((hf_base / "model.safetensors.index.json").read_text())
    checked = 0
    for shard in sorted(set(index["weight_map"].values())):
        for key, stored in load_file(hf_base / shard).items():
            assert stored.dtype == torch.bfloat16
            assert torch.equal(state[key], stored), key
            checked += 1
    assert checked == len(index["weight_map"])
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()  # tied


def test_the_converted_folder_loads_quantized_with_its_experts_as_saved(converted):
    from napari_tghmoe.engine import InferenceEngine

    engine = InferenceEngine.from_pretrained(converted[0], device="cpu", quantization="4bit", hash_weights=False)
    model = engine.model
    assert type(model.model.language_model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    state = model.state_dict()
    for key, value in load_file(converted[0] / "tghmoe_adapter.safetensors").items():
        assert torch.equal(state[key].to(value.dtype), value), key  # experts / LoRA unquantized, as saved
    answer = engine.ask(volume(), "Is the liver normal?", spacing=(2.0, 1.0, 1.0), max_new_tokens=2,
                        generation_options={"min_new_tokens": 2})
    assert answer.timings["n_tokens"] == 2 and "4bit" in answer.precision


def test_the_converted_config_records_the_processors_values(converted):
    config = json.loads((converted[0] / "config.json").read_text())
    assert config["image_mean"] == list(FIXTURE_MEAN) and config["image_std"] == list(FIXTURE_STD)
    assert (config["min_pixels"], config["max_pixels"]) == (3136, 12845056)
    assert config["volume_grid"] == [8, 56, 56]


# ------------------------------------------------------------------ the engine uses the folder's own settings


def test_the_engine_answers_with_the_folders_chat_template_and_processor(engine, monkeypatch):
    from napari_tghmoe.model.preprocess import frames_to_patches, resample_to_grid, window_channels

    captured = {}
    generate = engine.model.generate

    def spy(**kwargs):
        captured.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(engine.model, "generate", spy)
    ct = volume()
    answer = engine.ask(ct, "Is the liver normal?", spacing=(2.0, 1.0, 1.0), max_new_tokens=3,
                        generation_options={"min_new_tokens": 3})
    assert answer.timings["n_tokens"] == 3

    prompt = engine.tokenizer.decode(captured["input_ids"][0])
    assert MARKER in prompt  # chat_template.json, not the tokenizer_config.json copy without it
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert engine.info.chat_template_source == "chat_template.json"
    video_id = engine.model.config.video_token_id
    assert int((captured["input_ids"] == video_id).sum()) == 16

    settings = engine.prepare(ct, (2.0, 1.0, 1.0)).settings
    assert (settings.patch_size, settings.temporal_patch_size, settings.merge_size) == (14, 2, 2)
    assert settings.image_mean == FIXTURE_MEAN and settings.image_std == FIXTURE_STD
    assert engine.info.processor_sources == ("video_preprocessor_config.json", "preprocessor_config.json")
    pixels = captured["pixel_values_videos"]
    assert tuple(pixels.shape) == (4 * 4 * 4, 3 * 2 * 14 * 14)
    assert captured["video_grid_thw"].tolist() == [[4, 4, 4]]
    expected, _ = frames_to_patches(window_channels(resample_to_grid(ct, (8, 56, 56)), settings), settings)
    assert torch.allclose(pixels, expected)  # normalised with the folder's mean / std
    clip = settings.__class__(**{**settings.__dict__, "image_mean": (0.48145466, 0.4578275, 0.40821073),
                                 "image_std": (0.26862954, 0.26130258, 0.27577711)})
    assert not torch.allclose(pixels, frames_to_patches(window_channels(resample_to_grid(ct, (8, 56, 56)), clip), clip)[0])


def write_scan(folder: Path) -> Path:
    from napari_tghmoe.io import CTVolume, write_dicom_series

    hu = np.random.default_rng(1).normal(0, 40, (8, 48, 48)).astype(np.int16)
    write_dicom_series(CTVolume(hu=hu, spacing=(2.0, 0.9, 0.9), description="CT CHEST"), folder)
    return folder


def test_tghmoe_ask_answers_from_the_converted_folder(converted, tmp_path, capsys):
    from napari_tghmoe.cli import main

    scan = write_scan(tmp_path / "scan")
    out_json = tmp_path / "answer.json"
    code = main(["ask", str(scan), "Is there a liver lesion?", "--model", str(converted[0]), "--device", "cpu",
                 "--max-new-tokens", "3", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(out_json.read_text())
    assert record["question"] == "Is there a liver lesion?"
    assert "cpu" in captured.err


def test_tghmoe_ask_names_the_memory_it_lacks_and_takes_a_dtype(converted, tmp_path, capsys, monkeypatch):
    from napari_tghmoe.cli import main
    from napari_tghmoe.model import memory

    scan = write_scan(tmp_path / "scan")
    needed = memory.estimate_load_bytes(converted[0], "fp32", "cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: needed - 1)
    argv = ["ask", str(scan), "Is the liver normal?", "--model", str(converted[0]), "--device", "cpu",
            "--max-new-tokens", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(converted[0]) in err
    assert "not enough memory" in err and "--dtype bfloat16" in err
    assert main([*argv, "--dtype", "bfloat16"]) == 0  # half the bytes: fits in the same memory
    assert "bfloat16" in capsys.readouterr().err


def test_a_plain_hub_folder_loads_with_its_own_template_and_processor(hf_base):
    with pytest.warns(UserWarning, match="fresh"):
        model, tokenizer, info = load_model(hf_base, device="cpu", hash_weights=False)
    assert info.adapted_from_base and info.chat_template_source == "chat_template.json"
    assert MARKER in tokenizer.chat_template
    assert list(model.config.image_mean) == list(FIXTURE_MEAN)
    assert (model.config.min_pixels, model.config.max_pixels) == (3136, 12845056)


# ------------------------------------------------------------------ a base that moved, went or changed


def test_the_base_may_move_together_with_the_converted_folder(hf_base, converted, tmp_path):
    reference = json.loads((converted[0] / "tghmoe_base.json").read_text())
    out = tmp_path / "a" / "b" / "c" / converted[0].name  # deep enough for the ../.. of the relative path
    shutil.copytree(converted[0], out)
    base = (out / reference["base_path_relative"]).resolve()
    assert tmp_path in base.parents  # the pair moved together, under tmp_path
    shutil.copytree(hf_base, base)
    reference["base_path"] = str(tmp_path / "gone")  # only the relative path can find it now
    (out / "tghmoe_base.json").write_text(json.dumps(reference))
    _, _, info = load_model(out, device="cpu")
    assert info.base_path == str(base)


def one_line_error(path, **options) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_model(path, device="cpu", **options)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_a_missing_truncated_or_replaced_base_is_named(hf_base, converted, tmp_path):
    base = tmp_path / "hub" / hf_base.name
    shutil.copytree(hf_base, base)
    out = tmp_path / "models" / "tghmoe"
    shutil.copytree(converted[0], out)
    reference = json.loads((out / "tghmoe_base.json").read_text())
    reference["base_path"] = str(base)
    (out / "tghmoe_base.json").write_text(json.dumps(reference))
    assert load_model(out, device="cpu").model is not None  # the copy itself is right

    shard = sorted(base.glob("model-0000*.safetensors"))[0]
    data = shard.read_bytes()
    # same size, other bytes (another model's weights): found by the digest recorded at conversion
    tensors = load_file(shard)
    from safetensors.torch import save_file

    save_file({k: (v + 1).to(v.dtype) for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})
    assert shard.stat().st_size == len(data)
    assert "changed since conversion" in one_line_error(out)
    shard.write_bytes(data[: len(data) // 2])  # cut short
    assert "changed since conversion" in one_line_error(out)
    shard.unlink()
    assert "missing" in one_line_error(out) and shard.name in one_line_error(out)
    shutil.rmtree(base)
    message = one_line_error(out)
    assert "base model folder" in message and "not there" in message


def test_a_processor_whose_patches_differ_from_the_vision_tower_is_refused(converted, tmp_path):
    out = tmp_path / "tghmoe"
    shutil.copytree(converted[0], out)
    video = json.loads((out / "video_preprocessor_config.json").read_text())
    video["patch_size"] = 16
    (out / "video_preprocessor_config.json").write_text(json.dumps(video))
    message = one_line_error(out)
    assert "video_preprocessor_config.json" in message and "patch_size 16" in message and "14" in message
    (out / "video_preprocessor_config.json").write_text("{broken")
    assert "not valid JSON" in one_line_error(out)
