"""load_model: safe, offline, quantized loading with clear one-line errors and memory fallback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from napari_tghmoe.model.loading import (
    GIB,
    LoadPlan,
    ModelLoadError,
    ModelLoadWarning,
    ParameterCounts,
    choose_plan,
    estimate_memory_bytes,
    fallback_chain,
    load_model,
    load_with_fallback,
    resolve_plan,
)


def copy_folder(src, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def state_as_saved(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the key names save_pretrained writes."""
    saved = {}
    for key, value in model.state_dict().items():
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        saved[key] = value
    return saved


# ------------------------------------------------------------------ loading folders


def test_tghmoe_folder_loads_directly_with_every_tensor_as_saved(tuned_tghmoe_folder):
    from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration

    model, tokenizer, info = load_model(tuned_tghmoe_folder, device="cpu")

    assert isinstance(model, TGHMoEForConditionalGeneration)
    assert (info.is_tghmoe, info.adapted_from_base) == (True, False)
    assert (info.device, info.quantization, info.dtype) == ("cpu", "none", "float32")
    assert info.warnings == []
    assert len(info.weights_sha256) == 64
    file_tensors = load_file(tuned_tghmoe_folder / "model.safetensors")
    loaded = state_as_saved(model)
    assert set(file_tensors) <= set(loaded)
    for key, value in file_tensors.items():
        assert torch.equal(loaded[key], value), key
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in file_tensors.items())  # trained-like experts
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == model.config.video_token_id


def test_plain_qwen_folder_gets_fresh_experts_with_a_warning(tiny_qwen_folder):
    from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration

    with pytest.warns(ModelLoadWarning, match="fresh"):
        model, _, info = load_model(tiny_qwen_folder, device="cpu")

    assert isinstance(model, TGHMoEForConditionalGeneration)
    assert info.adapted_from_base and info.is_tghmoe
    assert any("fresh" in w for w in info.warnings)
    loaded = state_as_saved(model)
    for key, value in load_file(tiny_qwen_folder / "model.safetensors").items():
        assert torch.equal(loaded[key], value), key  # base tensors untouched by adaptation


def test_plain_qwen_folder_can_stay_unadapted(tiny_qwen_folder):
    model, _, info = load_model(tiny_qwen_folder, device="cpu", adapt=False, hash_weights=False)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not info.is_tghmoe and info.weights_sha256 is None


def test_cpu_bfloat16_when_asked(tuned_tghmoe_folder):
    model, _, info = load_model(tuned_tghmoe_folder, device="cpu", dtype="bf16", hash_weights=False)
    assert info.dtype == "bfloat16"
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.visual.patch_embed.proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("quantization", "linear_class"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")]
)
def test_bitsandbytes_quantizes_only_the_llm_on_cpu_and_generates(tuned_tghmoe_folder, quantization, linear_class):
    from napari_tghmoe.engine import Answer, InferenceEngine

    engine = InferenceEngine.from_pretrained(tuned_tghmoe_folder, device="cpu", quantization=quantization)
    model = engine.model
    layer = model.model.language_model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == linear_class
    assert type(layer.mlp.down_proj).__name__ == linear_class
    block = model.model.visual.blocks[model.config.moe_blocks[-1]]
    for kept in (block.mlp.up_proj, block.attn.qkv, model.lm_head, model.model.visual.merger.mlp[0]):
        assert type(kept) is torch.nn.Linear and kept.weight.dtype == torch.float32
    assert block.moe.groups["report"].lora_A.dtype == torch.float32
    assert block.moe.task_router.weight.dtype == torch.float32
    assert engine.info.quantization == quantization and quantization in engine.info.precision

    volume = np.random.default_rng(0).normal(0, 300, (8, 64, 64)).astype(np.float32)
    answer = engine.ask(volume, "Is the liver normal?", spacing=(2.0, 1.0, 1.0), max_new_tokens=4,
                        generation_options={"min_new_tokens": 4})
    assert isinstance(answer, Answer)
    assert answer.timings["n_tokens"] == 4
    assert answer.precision == engine.info.precision


# ------------------------------------------------------------------ clear errors


def one_line_error(path) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_model(path, device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


def test_a_tghmoe_folder_never_loads_as_a_plain_qwen_when_the_classes_fail_to_import(tuned_tghmoe_folder, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "napari_tghmoe.model.modeling", None)  # import raises
    message = one_line_error(tuned_tghmoe_folder)
    assert "could not be imported" in message and "modeling" in message


def test_missing_folder(tmp_path):
    assert "not found" in one_line_error(tmp_path / "nowhere")


def test_a_file_instead_of_a_folder(tuned_tghmoe_folder):
    assert "not a folder" in one_line_error(tuned_tghmoe_folder / "config.json")


def test_missing_and_broken_config(tmp_path, tuned_tghmoe_folder):
    folder = copy_folder(tuned_tghmoe_folder, tmp_path)
    (folder / "config.json").unlink()
    assert "no config.json" in one_line_error(folder)
    (folder / "config.json").write_text("{not json")
    assert "not valid JSON" in one_line_error(folder)


def test_wrong_architecture_names_it(tmp_path, tuned_tghmoe_folder):
    folder = copy_folder(tuned_tghmoe_folder, tmp_path)
    bert = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32}
    (folder / "config.json").write_text(json.dumps(bert))
    message = one_line_error(folder)
    assert "wrong architecture" in message and "bert" in message and "Qwen2.5-VL" in message


def test_pickle_checkpoint_is_refused(tmp_path, tuned_tghmoe_folder):
    folder = copy_folder(tuned_tghmoe_folder, tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    message = one_line_error(folder)
    assert "pytorch_model.bin" in message and "pickle" in message and "safetensors" in message


def test_folder_without_weights(tmp_path, tuned_tghmoe_folder):
    folder = copy_folder(tuned_tghmoe_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    assert "no .safetensors weights" in one_line_error(folder)


def test_missing_tokenizer(tmp_path, tuned_tghmoe_folder):
    folder = copy_folder(tuned_tghmoe_folder, tmp_path)
    (folder / "tokenizer.json").unlink()
    assert "no tokenizer" in one_line_error(folder)


def test_tokenizer_of_another_model(tmp_path, tuned_tghmoe_folder):
    folder = copy_folder(tuned_tghmoe_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["video_token_id"] = 5  # the tokenizer's <|video_pad|> is 6
    (folder / "config.json").write_text(json.dumps(config))
    assert "tokenizer does not match" in one_line_error(folder)


def test_corrupt_weights_are_a_load_error_not_a_crash(tmp_path, tuned_tghmoe_folder):
    folder = copy_folder(tuned_tghmoe_folder, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "cannot" in one_line_error(folder)


def _shard(folder) -> list[str]:
    """Split the single checkpoint into two shards with the index transformers writes."""
    from safetensors.torch import save_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for name, part in zip(names, halves):
        save_file({k: state[k].contiguous() for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return names


def test_sharded_folder_with_a_missing_or_corrupt_shard(tmp_path, tuned_tghmoe_folder):
    folder = copy_folder(tuned_tghmoe_folder, tmp_path)
    names = _shard(folder)
    assert load_model(folder, device="cpu").model is not None  # the shards themselves are right

    (folder / names[1]).rename(tmp_path / "aside.safetensors")
    message = one_line_error(folder)
    assert "1 of 2 weight shard(s) missing" in message and names[1] in message

    (tmp_path / "aside.safetensors").rename(folder / names[1])
    data = (folder / names[1]).read_bytes()
    (folder / names[1]).write_bytes(data[: len(data) // 3])  # a copy cut short
    assert "not valid safetensors" in one_line_error(folder)

    (folder / "model.safetensors.index.json").write_text("{broken")
    assert "not a valid shard index" in one_line_error(folder)


# ------------------------------------------------------------------ planning and memory fallback (pure)

COUNTS_3B = ParameterCounts(llm=3_000_000_000, other=700_000_000)


def test_auto_choices():
    assert resolve_plan("auto", "auto", None, cuda_available=False) == LoadPlan("cpu", "none", "float32")
    assert resolve_plan("auto", "auto", None, cuda_available=True) == LoadPlan("cuda", "4bit", "bfloat16")
    assert resolve_plan("cpu", "8bit", "bf16", cuda_available=True) == LoadPlan("cpu", "8bit", "bfloat16")
    with pytest.raises(ValueError, match="quantization"):
        resolve_plan("cpu", "3bit", None, cuda_available=False)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_plan("cuda", "auto", None, cuda_available=False)


def test_memory_estimate_orders_the_precisions():
    plans = [LoadPlan("cuda", q, "bfloat16") for q in ("4bit", "8bit", "none")]
    sizes = [estimate_memory_bytes(COUNTS_3B, p) for p in plans]
    assert sizes == sorted(sizes)
    assert 2.5 * GIB < sizes[0] < 4 * GIB  # 3B in 4-bit + 0.7B bf16 + 1 GiB headroom


def test_enough_gpu_memory_keeps_the_requested_plan():
    requested = LoadPlan("cuda", "none", "bfloat16")
    assert choose_plan(requested, COUNTS_3B, free_gpu_bytes=40 * GIB) == (requested, [])


def test_too_little_gpu_memory_falls_back_to_4bit_then_cpu():
    requested = LoadPlan("cuda", "none", "bfloat16")
    plan, messages = choose_plan(requested, COUNTS_3B, free_gpu_bytes=5 * GIB)
    assert plan == LoadPlan("cuda", "4bit", "bfloat16")
    assert "4bit" in messages[0] and "5.0 GiB" in messages[0]

    plan, messages = choose_plan(requested, COUNTS_3B, free_gpu_bytes=1 * GIB)
    assert plan.device == "cpu" and plan.quantization == "none"
    assert "CPU" in messages[-1]


def test_unknown_free_memory_or_cpu_keeps_the_plan():
    assert choose_plan(LoadPlan("cuda", "4bit", "bfloat16"), COUNTS_3B, None)[0].on_cuda
    cpu = LoadPlan("cpu", "none", "float32")
    assert choose_plan(cpu, COUNTS_3B, 0) == (cpu, [])
    assert fallback_chain(cpu) == [cpu]


def test_out_of_memory_while_loading_moves_to_the_next_plan():
    tried = []

    def fake_loader(plan):
        tried.append(plan)
        if plan.on_cuda:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "model on cpu"

    notes: list[str] = []
    result, plan = load_with_fallback(fallback_chain(LoadPlan("cuda", "8bit", "bfloat16")), fake_loader, notes)
    assert result == "model on cpu" and plan.device == "cpu"
    assert [p.quantization for p in tried] == ["8bit", "4bit", "none"]
    assert len(notes) == 2 and "out of GPU memory" in notes[0]


def test_other_load_errors_are_not_swallowed_by_the_fallback():
    def broken(plan):
        raise RuntimeError("size mismatch for lm_head.weight")

    with pytest.raises(RuntimeError, match="size mismatch"):
        load_with_fallback(fallback_chain(LoadPlan("cuda", "4bit", "bfloat16")), broken, [])


# ------------------------------------------------------------------ tghmoe convert


def test_convert_writes_a_tghmoe_checkpoint_that_loads_directly(tiny_qwen_folder, tmp_path, capsys):
    from napari_tghmoe.cli import main
    from napari_tghmoe.model.modeling import ADAPTER_KEY, TGHMoEForConditionalGeneration

    out = tmp_path / "converted"
    argv = ["convert", "--base", str(tiny_qwen_folder), "--out", str(out), "--moe-blocks", "2,3",
            "--experts", "2", "--top-k", "1", "--volume-grid", "8,64,64"]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"tghmoe_adapter.safetensors", "tghmoe_base.json", "config.json", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # the base is referred to, not copied
    assert json.loads((out / "config.json").read_text())["model_type"] == "tghmoe_qwen2_5_vl"

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelLoadWarning)  # a TGH-MoE folder loads without adaptation
        model, _, info = load_model(out, device="cpu")
    assert isinstance(model, TGHMoEForConditionalGeneration) and not info.adapted_from_base
    assert info.base_path == str(tiny_qwen_folder.resolve())
    assert model.config.moe_blocks == [2, 3] and model.config.router_top_k == 1
    assert set(model.config.experts_per_group.values()) == {2}
    assert model.config.volume_grid == [8, 64, 64]

    adapter = load_file(out / "tghmoe_adapter.safetensors")
    assert adapter and all(ADAPTER_KEY.search(k) for k in adapter)  # experts, routers, LoRA only
    loaded = state_as_saved(model)
    for key, value in load_file(tiny_qwen_folder / "model.safetensors").items():
        assert torch.equal(loaded[key], value), key  # every base tensor bit-identical
    state = model.state_dict()
    for key, value in adapter.items():
        assert torch.equal(state[key], value), key  # and every added tensor as saved


def test_convert_standalone_copies_the_base_into_one_folder(tiny_qwen_folder, tmp_path, capsys):
    from napari_tghmoe.cli import main

    out = tmp_path / "standalone"
    assert main(["convert", "--base", str(tiny_qwen_folder), "--out", str(out), "--standalone"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "tghmoe_base.json" not in names
    base_tensors = load_file(tiny_qwen_folder / "model.safetensors")
    converted = load_file(out / "model.safetensors")
    assert len(converted) > len(base_tensors)  # experts, routers, LoRA added
    for key, value in base_tensors.items():
        assert torch.equal(converted[key], value), key
    model, _, info = load_model(out, device="cpu", hash_weights=False)
    assert info.base_path is None and info.is_tghmoe and not info.adapted_from_base


def test_convert_refuses_to_overwrite_and_bad_bases_in_one_line(tiny_qwen_folder, tuned_tghmoe_folder, tmp_path, capsys):
    from napari_tghmoe.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["convert", "--base", str(tiny_qwen_folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and len(err.splitlines()) == 1
    assert (out / "notes.txt").read_text() == "keep me"

    assert main(["convert", "--base", str(tuned_tghmoe_folder), "--out", str(tmp_path / "x")]) == 2
    assert "already a TGH-MoE" in capsys.readouterr().err
    assert main(["convert", "--base", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

    assert main(["convert", "--base", str(tiny_qwen_folder), "--out", str(out), "--overwrite"]) == 0
    assert (out / "tghmoe_adapter.safetensors").is_file() and not (out / "notes.txt").exists()
