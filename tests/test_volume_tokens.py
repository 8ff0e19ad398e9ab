"""The pre-trained 3D encoder's tokens beside the video tokens (model/volume_tokens.py).

Tiny models throughout: the tiny Qwen2.5-VL of ``model.tiny`` with its tokenizer, and the tiny
Med3DInsight segmentation model of ``med3d.encoder.build_tiny_seg_model`` as the 3D encoder.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from napari_tghmoe.io import CTVolume
from napari_tghmoe.model.modeling import ADAPTER_KEY, TGHMoEForConditionalGeneration, adapt_2d_mllm, set_stage
from napari_tghmoe.model.prompts import PromptBuilder
from napari_tghmoe.model.tiny import build_tiny_base_model
from napari_tghmoe.model.volume_tokens import VOLUME_PAD_TOKEN, attach_volume_encoder

ROOT = Path(__file__).resolve().parents[1]
GRID = (8, 64, 64)  # the model's volume grid: video grid (4, 8, 8) -> 64 LLM video tokens
TOKENS_GRID = [1, 2, 2]  # 4 volume tokens


# ---------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def seg_folder(tmp_path_factory):
    from napari_tghmoe.med3d.encoder import build_tiny_seg_model

    return build_tiny_seg_model(tmp_path_factory.mktemp("seg") / "tiny-seg")


@pytest.fixture(scope="module")
def ct():
    """A CT in HU with a body in air (12 x 70 x 60 voxels at 2.5 x 1 x 1 mm)."""
    rng = np.random.default_rng(0)
    hu = np.full((12, 70, 60), -1000.0, dtype=np.float32)
    hu[:, 10:60, 8:52] = rng.normal(40, 60, (12, 50, 44))
    return CTVolume(hu, spacing=(2.5, 1.0, 1.0))


def fresh_tokenizer():
    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS, build_tokenizer

    return build_tokenizer(DEFAULT_CORPUS, vocab_size=512)


def tiny_model(vocab_size: int = 512, seed: int = 0) -> TGHMoEForConditionalGeneration:
    base = build_tiny_base_model(seed=seed, vocab_size=vocab_size)
    return adapt_2d_mllm(base, {"volume_grid": list(GRID), "moe_blocks": [2, 3], "experts_per_group": 2}).eval()


def with_encoder(seg_folder, vocab_size: int = 512):
    """(model with the tiny encoder attached, its tokenizer, whether the tokenizer gained a token)."""
    model, tokenizer = tiny_model(vocab_size), fresh_tokenizer()
    added = attach_volume_encoder(model, seg_folder, tokenizer, tokens_grid=TOKENS_GRID, experts=3, hidden=16)
    return model.eval(), tokenizer, added


def randomise_projector(model, seed: int = 3) -> None:
    """The projector starts adding zeros: give its output layer and positions values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.volume_projector.named_parameters():
            if name in ("w_out", "b_out", "position"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def forward_inputs(model, tokenizer, ct, question: str = "Is there a nodule in the left lung?") -> dict:
    from napari_tghmoe.model.preprocess import prepare_volume

    volume = prepare_volume(ct, None, model.config)
    prompt = PromptBuilder(tokenizer, model.config).build_inputs(question, volume.num_video_tokens)
    inputs = {
        "input_ids": prompt.input_ids,
        "attention_mask": prompt.attention_mask,
        "mm_token_type_ids": prompt.mm_token_type_ids,
        "text_guidance_mask": prompt.text_guidance_mask,
        **volume.model_kwargs(),
    }
    if model.config.volume_encoder:
        inputs["volume_features"] = model.volume_features(ct)[None]
    return inputs


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not ADAPTER_KEY.search(k)}


# ---------------------------------------------------------------------------- the base stays the base
def test_attaching_and_training_leave_every_base_tensor_and_the_encoder_bit_identical(seg_folder, ct):
    model, tokenizer = tiny_model(), fresh_tokenizer()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    attach_volume_encoder(model, seg_folder, tokenizer, tokens_grid=TOKENS_GRID, experts=3, hidden=16)
    after = model.state_dict()
    for key, value in before.items():  # the base and the experts: not a bit changed by attaching
        assert torch.equal(after[key], value), key
    new_keys = set(after) - set(before)
    assert new_keys and all(k.startswith("volume_projector.") for k in new_keys)
    assert all(ADAPTER_KEY.search(k) for k in new_keys)  # saved with the TGH-MoE tensors
    assert not any(k.startswith("volume_encoder") or ".backbone." in k for k in after)  # the encoder is not in it

    base = base_state(model)
    inputs = forward_inputs(model, tokenizer, ct)
    model.train()
    gates = {}
    for stage in (1, 2):
        counts = set_stage(model, stage)
        assert counts["volume_gate"] > 0 and (counts["volume_projector"] > 0) == (stage == 1)
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        for _ in range(2):
            out = model(**inputs, labels=inputs["input_ids"], task_labels=torch.tensor([2]))
            optimiser.zero_grad()
            out.loss.backward()
            optimiser.step()
        gates[stage] = model.volume_projector.gate.weight.detach().clone()
        if stage == 1:
            trained_out = model.volume_projector.w_out.detach().clone()
            assert trained_out.abs().sum() > 0  # stage 1 did train the projector
    assert torch.equal(model.volume_projector.w_out, trained_out)  # stage 2: only its gate moves
    assert not torch.equal(gates[1], gates[2])
    state = model.state_dict()
    for key, value in base.items():
        assert torch.equal(state[key], value), key
    saved = load_file(seg_folder / "model.safetensors")
    encoder_state = model.volume_encoder.state_dict()
    assert saved and all(torch.equal(encoder_state[k], v) for k, v in saved.items())
    assert not any(p.requires_grad for p in model.volume_encoder.parameters())


# ---------------------------------------------------------------------------- no encoder: as before
def test_without_an_encoder_the_prompt_and_the_logits_are_the_plain_models(tiny_qwen_folder, tmp_path, ct, seg_folder):
    """A bare converted Qwen2.5-VL (no volume encoder) loads and answers as the base model does,
    from the prompt it always had; an attached encoder only adds its block."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from napari_tghmoe.cli import main
    from napari_tghmoe.engine import InferenceEngine
    from napari_tghmoe.model.preprocess import prepare_volume

    out = tmp_path / "converted"
    assert main(["convert", "--base", str(tiny_qwen_folder), "--out", str(out), "--volume-grid", "8,64,64"]) == 0
    engine = InferenceEngine.from_pretrained(out, device="cpu")
    config = engine.model.config
    assert config.volume_encoder == "" and config.num_volume_tokens == 0
    assert not hasattr(engine.model, "volume_projector") and engine.model.volume_encoder is None

    question = "Is there a nodule in the left lung?"
    volume = prepare_volume(ct, None, config)
    prompt = engine.build_inputs(question, volume.num_video_tokens)
    # today's prompt, written out: the rendered chat with the one video placeholder expanded
    rendered = engine.tokenizer(engine.render_prompt(question), add_special_tokens=False)["input_ids"]
    expected: list[int] = []
    for token in rendered:
        expected += [token] * volume.num_video_tokens if token == config.video_token_id else [token]
    assert prompt.input_ids[0].tolist() == expected

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_folder).eval()
    kwargs = {"input_ids": prompt.input_ids, "mm_token_type_ids": prompt.mm_token_type_ids, **volume.model_kwargs()}
    with torch.no_grad():
        reference = base(**kwargs).logits
        got = engine.model(**kwargs, text_guidance_mask=prompt.text_guidance_mask).logits
    assert torch.equal(got, reference)
    answer = engine.ask(ct, question, max_new_tokens=3)
    assert isinstance(answer.text, str) and answer.routing.volume_gate is None
    assert "volume_gate" not in answer.routing.summary()

    # the same config with an encoder: the same ids plus one block after the video
    model, tokenizer, _ = with_encoder(seg_folder)
    plain = PromptBuilder(tokenizer, tiny_model().config).build_inputs(question, volume.num_video_tokens)
    withenc = PromptBuilder(tokenizer, model.config).build_inputs(question, volume.num_video_tokens)
    ids, plain_ids = withenc.input_ids[0].tolist(), plain.input_ids[0].tolist()
    at = len(plain_ids) - plain_ids[::-1].index(config.video_token_id) + 1  # after the video's <|vision_end|>
    n = model.config.num_volume_tokens
    assert ids[:at] + ids[at + n + 2 :] == plain_ids
    assert ids[at : at + n + 2] == [config.vision_start_token_id] + [model.config.volume_token_id] * n + [config.vision_end_token_id]


# ---------------------------------------------------------------------------- placeholders and the hook
@pytest.mark.parametrize("vocab_size", [512, 520], ids=["pad-placeholder", "vision-pad-added"])
def test_the_prompt_carries_n_placeholders_whose_embeddings_are_the_projector_output(seg_folder, ct, vocab_size):
    model, tokenizer, added = with_encoder(seg_folder, vocab_size)
    config = model.config
    if vocab_size == 512:  # the tiny tokenizer fills the table: the pad token is the placeholder
        assert not added and config.volume_token_id == tokenizer.pad_token_id
    else:  # a free embedding row: <|vision_pad|> is added there, as Qwen's own reserved token
        assert added and config.volume_token_id == tokenizer.convert_tokens_to_ids(VOLUME_PAD_TOKEN) == 512
    randomise_projector(model)
    inputs = forward_inputs(model, tokenizer, ct)
    ids = inputs["input_ids"][0]
    n = config.num_volume_tokens
    positions = model.volume_token_positions(inputs["input_ids"], inputs["attention_mask"])[0]
    assert n == int(np.prod(TOKENS_GRID)) and int(positions.sum()) == n == int((ids == config.volume_token_id).sum())
    first = int(positions.nonzero()[0])
    assert ids[first - 1] == config.vision_start_token_id and ids[first + n] == config.vision_end_token_id
    assert ids[first - 2] == config.vision_end_token_id and ids[first - 3] == config.video_token_id
    assert not inputs["text_guidance_mask"][0, positions].any()

    seen = {}

    def capture(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        handle.remove()
    embeds = seen["embeds"][0]
    with torch.no_grad():
        text = model.text_features(inputs["input_ids"], text_guidance_mask=inputs["text_guidance_mask"])
        projected, gate = model.volume_projector(inputs["volume_features"], text)
        plain = model.get_input_embeddings()(inputs["input_ids"])[0]
    assert projected.abs().sum() > 0
    torch.testing.assert_close(embeds[positions], projected[0], rtol=0, atol=0)
    torch.testing.assert_close(out.volume_gate, gate, rtol=0, atol=0)
    text_positions = ~positions & (ids != config.video_token_id)
    assert torch.equal(embeds[text_positions], plain[text_positions])  # only the placeholders changed
    # and the hook is gone afterwards: the embedding module gives the table again
    with torch.no_grad():
        assert torch.equal(model.get_input_embeddings()(inputs["input_ids"])[0], plain)

    # batches: right padding (the collate path) with the pad token is never taken for a volume token
    padded = torch.cat([inputs["input_ids"], torch.full((1, 5), tokenizer.pad_token_id)], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.zeros((1, 5), dtype=torch.long)], dim=1)
    assert int(model.volume_token_positions(padded, mask).sum()) == n

    with pytest.raises(ValueError, match="volume_features"):
        model(**{k: v for k, v in inputs.items() if k != "volume_features"})


def test_generate_reads_the_volume_tokens_in_the_prefill_only(seg_folder, ct):
    model, tokenizer, _ = with_encoder(seg_folder)
    randomise_projector(model)
    inputs = forward_inputs(model, tokenizer, ct)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id, min_new_tokens=4)
    with torch.no_grad(), model.record_routing() as recorder:
        tokens = model.generate(**inputs, **settings)
        zeros = model.generate(**{**inputs, "volume_features": torch.zeros_like(inputs["volume_features"])}, **settings)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 4
    assert len(recorder.traces) == 2 and recorder.traces[0].volume_gate is not None
    with torch.no_grad():  # the first new token is what one forward over the prompt predicts
        logits = model(**inputs).logits[0, -1]
        logits_zero = model(**{**inputs, "volume_features": torch.zeros_like(inputs["volume_features"])}).logits[0, -1]
    assert int(tokens[0, inputs["input_ids"].shape[1]]) == int(logits.argmax())
    assert not torch.allclose(logits, logits_zero)  # what the encoder saw reaches the answer
    assert int(zeros[0, inputs["input_ids"].shape[1]]) == int(logits_zero.argmax())


# ---------------------------------------------------------------------------- text guidance and traces
def test_the_projector_gate_follows_the_instruction_and_is_in_the_routing_trace(seg_folder, ct):
    model, tokenizer, _ = with_encoder(seg_folder)
    gates = {}
    for question in ("Is there a nodule in the left lung?", "Write a radiology report of the findings."):
        inputs = forward_inputs(model, tokenizer, ct, question)
        with torch.no_grad(), model.record_routing() as recorder:
            out = model(**inputs)
        trace = recorder.trace
        assert trace.volume_gate.shape == (1, model.config.volume_projector_experts)
        np.testing.assert_allclose(trace.volume_gate, out.volume_gate.numpy(), rtol=0, atol=0)
        assert trace.summary()["volume_gate"] == trace.volume_gate.tolist()
        assert trace.task_probs() and trace.utilisation(trace.blocks[-1]).shape == (len(trace.expert_names),)
        gates[question] = out.volume_gate[0]
    first, second = gates.values()
    assert float((first - second).abs().max()) > 1e-3
    model.config.text_guidance = False  # the ablation: no text, one gate for every question
    try:
        flat = []
        for question in gates:
            with torch.no_grad():
                flat.append(model(**forward_inputs(model, tokenizer, ct, question)).volume_gate[0])
        assert torch.equal(flat[0], flat[1])
    finally:
        model.config.text_guidance = True


def test_the_encoder_tokens_describe_the_ct(seg_folder, ct):
    from napari_tghmoe.model.volume_tokens import encode_volume, load_volume_encoder

    encoder = load_volume_encoder(seg_folder)
    features = encode_volume(encoder, ct, TOKENS_GRID)
    channels, kinds = encoder.config.encoder_channels, len(encoder.config.finding_kinds)
    assert features.shape == (4, channels + kinds) and torch.isfinite(features).all()
    presence = features[:, channels:]
    assert torch.equal(presence, presence[:1].expand_as(presence)) and ((presence >= 0) & (presence <= 1)).all()
    assert not torch.allclose(features[0, :channels], features[-1, :channels])  # tokens differ by place
    # a [0, 1] display-intensity volume reaches the encoder as pseudo-HU on the soft-tissue window,
    # not as values near water
    from napari_tghmoe.ct_windows import SOFT_TISSUE

    low, width = SOFT_TISSUE[0] - SOFT_TISSUE[1] / 2, SOFT_TISSUE[1]
    unit_values = np.clip((ct.hu - low) / width, 0, 1).astype(np.float32)
    unit = CTVolume(unit_values, spacing=ct.spacing, metadata={"intensity": "unit"})
    as_hu = CTVolume(unit_values * width + low, spacing=ct.spacing, metadata={"intensity": "hu"})
    as_is = CTVolume(unit_values, spacing=ct.spacing, metadata={"intensity": "hu"})
    from_unit = encode_volume(encoder, unit, TOKENS_GRID)
    torch.testing.assert_close(from_unit, encode_volume(encoder, as_hu, TOKENS_GRID))
    assert not torch.allclose(from_unit, encode_volume(encoder, as_is, TOKENS_GRID))
    other = CTVolume(ct.hu[:, ::-1].copy(), spacing=ct.spacing)
    assert not torch.allclose(encode_volume(encoder, other, TOKENS_GRID)[:, :channels], features[:, :channels])


# ---------------------------------------------------------------------------- save / load
def test_save_pretrained_and_from_pretrained_give_the_same_logits(seg_folder, ct, tmp_path):
    from napari_tghmoe.model.loading import load_model

    model, tokenizer, _ = with_encoder(seg_folder)
    randomise_projector(model)
    inputs = forward_inputs(model, tokenizer, ct)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["volume_encoder"] == "volume_encoder" and saved["volume_tokens_grid"] == TOKENS_GRID
    assert (tmp_path / "m" / "volume_encoder" / "model.safetensors").read_bytes() == (seg_folder / "model.safetensors").read_bytes()
    assert any(k.startswith("volume_projector.") for k in load_file(tmp_path / "m" / "model.safetensors"))

    reloaded = TGHMoEForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    assert reloaded.volume_encoder is not None
    with torch.no_grad():
        assert torch.equal(reloaded(**forward_inputs(reloaded, tokenizer, ct)).logits, expected)
    loaded = load_model(tmp_path / "m", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded.model(**forward_inputs(loaded.model, loaded.tokenizer, ct)).logits, expected)

    (tmp_path / "m" / "volume_encoder" / "model.safetensors").unlink()
    with pytest.raises(Exception) as caught:
        load_model(tmp_path / "m", device="cpu")
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "m") in message and "volume encoder" in message


# ---------------------------------------------------------------------------- tghmoe attach-encoder
def test_attach_encoder_writes_a_folder_the_engine_loads_and_answers_from(tuned_tghmoe_folder, seg_folder, ct, tmp_path, capsys):
    from napari_tghmoe.cli import main
    from napari_tghmoe.engine import InferenceEngine

    out = tmp_path / "with-encoder"
    argv = ["attach-encoder", "--model", str(tuned_tghmoe_folder), "--encoder", str(seg_folder), "--out", str(out),
            "--tokens-grid", "1,2,2", "--experts", "2", "--hidden", "16"]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    original = load_file(tuned_tghmoe_folder / "model.safetensors")
    written = load_file(out / "model.safetensors")
    for key, value in original.items():  # base tensors and experts exactly as they were
        assert torch.equal(written[key], value), key
    assert set(written) - set(original) and all(k.startswith("volume_projector.") for k in set(written) - set(original))
    assert (out / "volume_encoder" / "config.json").is_file()

    engine = InferenceEngine.from_pretrained(out, device="cpu")
    assert engine.has_volume_encoder and engine.model.config.num_volume_tokens == 4
    answer = engine.ask(ct, "Is there a nodule in the left lung?", max_new_tokens=3)
    assert isinstance(answer.text, str)
    assert answer.routing.volume_gate.shape == (1, 2) and answer.task_probs
    prepared = engine.prepare(ct)  # prepared inputs carry the encoder's tokens (evaluation uses them)
    assert prepared.volume_features.shape == (4, engine.model.config.volume_feature_size)
    assert isinstance(engine.ask(prepared, "Write the report.", max_new_tokens=2).text, str)

    # a fresh projector adds zero vectors: the answer moves only by the attention the block gets
    plain = InferenceEngine.from_pretrained(tuned_tghmoe_folder, device="cpu")
    assert plain.ask(ct, "Is there a nodule?", max_new_tokens=1, trace=False).text is not None


def test_attach_encoder_keeps_a_converted_folder_referring_to_its_base(tiny_qwen_folder, seg_folder, ct, tmp_path):
    from napari_tghmoe.cli import main
    from napari_tghmoe.engine import InferenceEngine

    converted, out = tmp_path / "converted", tmp_path / "with-encoder"
    assert main(["convert", "--base", str(tiny_qwen_folder), "--out", str(converted), "--volume-grid", "8,64,64"]) == 0
    assert main(["attach-encoder", "--model", str(converted), "--encoder", str(seg_folder), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"tghmoe_base.json", "tghmoe_adapter.safetensors", "volume_encoder"} <= names and "model.safetensors" not in names
    adapter = load_file(out / "tghmoe_adapter.safetensors")
    before = load_file(converted / "tghmoe_adapter.safetensors")
    assert all(torch.equal(adapter[k], v) for k, v in before.items())
    assert {k for k in adapter if k not in before} and all(ADAPTER_KEY.search(k) for k in adapter)
    engine = InferenceEngine.from_pretrained(out, device="cpu")
    assert engine.info.base_path == str(tiny_qwen_folder.resolve())
    assert engine.model.config.volume_tokens_grid == [2, 4, 4]  # the default grid
    assert isinstance(engine.ask(ct, "Where is the lesion?", max_new_tokens=2).text, str)


def test_a_bad_encoder_folder_is_one_line_naming_it(tuned_tghmoe_folder, tmp_path, capsys):
    from napari_tghmoe.cli import main

    out = tmp_path / "never"
    for bad in (tmp_path / "missing", Path(tuned_tghmoe_folder)):  # not there; a chat model, not a segmenter
        code = main(["attach-encoder", "--model", str(tuned_tghmoe_folder), "--encoder", str(bad), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and str(bad) in err, err
        assert not out.exists()


# ---------------------------------------------------------------------------- tghmoe train
def test_training_both_stages_with_the_encoder_trains_the_projector_and_leaves_base_and_encoder(tmp_path, seg_folder, monkeypatch):
    """A smoke run of the tiny recipe with [model] volume_encoder: the base frozen (no also_train)."""
    from napari_tghmoe.train.recipe import RecipeError, recipe_from_dict
    from napari_tghmoe.train.trainer import build_model, train

    monkeypatch.setenv("TGHMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TGHMOE_TRAIN_THREADS", "1")
    values = tomllib.loads((ROOT / "recipes" / "tiny-test.toml").read_text())
    values["model"]["volume_encoder"] = str(seg_folder)
    values["model"]["moe"].update(volume_tokens_grid=TOKENS_GRID, volume_projector_hidden=16)
    values["data"]["train"] = ["phantom:seeds=0-1,region=both,shape=8x64x64"]
    values["stage1"].update(steps=2, save_every=2, log_every=1, gradient_accumulation_steps=1, also_train=[])
    values["stage2"].update(steps=2, save_every=2)
    recipe = recipe_from_dict(values, "volume-smoke")
    train(recipe, 1, tmp_path / "s1", progress=False)
    train(recipe, 2, tmp_path / "s2", init=tmp_path / "s1", progress=False)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "s1")
    assert VOLUME_PAD_TOKEN in tokenizer.get_vocab()  # a model built here gets its own placeholder row
    fresh = build_model(recipe, tokenizer=tokenizer)  # the stage-1 start (same seeds)
    start = fresh.state_dict()
    stage1, stage2 = load_file(tmp_path / "s1" / "model.safetensors"), load_file(tmp_path / "s2" / "model.safetensors")
    loaded = TGHMoEForConditionalGeneration.from_pretrained(tmp_path / "s1").state_dict()
    for key, value in start.items():
        if not ADAPTER_KEY.search(key):
            assert torch.equal(loaded[key], value), key  # base: as built
    assert not torch.equal(loaded["volume_projector.w_out"], start["volume_projector.w_out"])  # stage 1 trained it
    assert torch.equal(stage2["volume_projector.w_out"], stage1["volume_projector.w_out"])  # stage 2 did not
    assert not torch.equal(stage2["volume_projector.gate.weight"], stage1["volume_projector.gate.weight"])
    for stage in ("s1", "s2"):
        assert (tmp_path / stage / "volume_encoder" / "model.safetensors").read_bytes() == (seg_folder / "model.safetensors").read_bytes()
    summary = json.loads((tmp_path / "s2" / "training_summary.json").read_text())
    assert summary["volume_encoder"]["frozen"] and summary["volume_encoder"]["volumes_encoded"] >= 1
    assert summary["trainable"]["volume_gate"] > 0 and summary["trainable"]["volume_projector"] == 0

    values["model"]["volume_encoder"] = str(tmp_path / "nowhere")
    with pytest.raises(RecipeError, match="nowhere"):
        recipe_from_dict(values, "volume-smoke")


def test_collate_gives_each_sample_its_cached_encoder_tokens(seg_folder, tmp_path, monkeypatch):
    from napari_tghmoe.datasets.samples import Sample
    from napari_tghmoe.model.volume_tokens import VolumeFeatureCache
    from napari_tghmoe.train.collate import collate

    model, tokenizer, _ = with_encoder(seg_folder)
    rng = np.random.default_rng(1)
    volumes = [CTVolume(rng.normal(0, 200, (8, 40, 40)).astype(np.float32), spacing=(4.0, 2.0, 2.0)) for _ in range(2)]
    samples = [Sample(volumes[0], "Write the report.", "Clear.", "report"),
               Sample(volumes[0], "Any nodule?", "No.", "vqa_open"),
               Sample(volumes[1], "Any cyst?", "Yes.", "vqa_open")]
    cache = VolumeFeatureCache(model.volume_encoder, TOKENS_GRID)
    batch = collate(samples, tokenizer, model.config, volume_features=cache)
    assert len(cache) == 2  # one encoder run per volume, not per sample
    features = batch["volume_features"]
    assert features.shape == (3, 4, model.config.volume_feature_size)
    assert torch.equal(features[0], features[1]) and not torch.equal(features[0], features[2])
    positions = model.volume_token_positions(batch["input_ids"], batch["attention_mask"])
    assert positions.sum(1).tolist() == [4, 4, 4]
    assert (batch["labels"][positions] == -100).all()
    zeros = collate(samples, tokenizer, model.config, volume_features=cache, zero_image=True)
    assert not zeros["volume_features"].any()
    with pytest.raises(ValueError, match="volume"):
        collate(samples, tokenizer, model.config)


def test_a_real_qwen_layout_uses_its_reserved_vision_pad_token(tmp_path, seg_folder, ct):
    """Qwen2.5-VL's tokenizer has <|vision_pad|> (its config's ``vision_token_id``, unused by the
    processor): it becomes the placeholder as it is, the tokenizer unchanged, bf16 shards untouched."""
    from napari_tghmoe.cli import main
    from napari_tghmoe.engine import InferenceEngine
    from napari_tghmoe.model.hf_layout import build_hf_layout_folder

    base = build_hf_layout_folder(tmp_path / "Qwen2.5-VL-tiny")
    converted, out = tmp_path / "converted", tmp_path / "with-encoder"
    assert main(["convert", "--base", str(base), "--out", str(converted), "--volume-grid", "8,56,56"]) == 0
    assert main(["attach-encoder", "--model", str(converted), "--encoder", str(seg_folder), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    vocab = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    assert config["volume_token_id"] == base_config["vision_token_id"] == next(
        t["id"] for t in vocab if t["content"] == VOLUME_PAD_TOKEN
    )
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    engine = InferenceEngine.from_pretrained(out, device="cpu")
    prompt = engine.build_inputs("Is there a liver lesion?", 16)
    assert int((prompt.input_ids == config["volume_token_id"]).sum()) == 32
    answer = engine.ask(ct, "Is there a liver lesion?", max_new_tokens=2)
    assert isinstance(answer.text, str) and answer.routing.volume_gate.shape == (1, 4)
