"""Shared pytest fixtures (several helpers append here; keep each block self-contained)."""

import pytest


# --- a tiny random TGH-MoE model folder (chat, routing, report, CLI) -----------------------
@pytest.fixture(scope="session")
def tiny_tghmoe_folder(tmp_path_factory):
    """An untrained tiny TGH-MoE folder (safetensors + tokenizer) saved with save_pretrained.

    Built once per session from ``model/tiny.py`` + ``adapt_2d_mllm`` + ``build_tokenizer``
    (the same builder as the demo's placeholder), volume grid 8x64x64 for speed.
    """
    from napari_tghmoe.model.placeholder import build_placeholder_model

    return build_placeholder_model(tmp_path_factory.mktemp("models") / "tiny-tghmoe", volume_grid=(8, 64, 64))


# --- tiny model folders (model loading, engine) -------------------------------------------
TINY_VOLUME_GRID = (8, 64, 64)  # -> video grid (4, 8, 8), 64 LLM video tokens


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A tiny byte-level BPE tokenizer with the specials at ``TINY_SPECIAL_TOKENS`` ids."""
    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS, build_tokenizer

    return build_tokenizer(DEFAULT_CORPUS, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_qwen_folder(tmp_path_factory, tiny_tokenizer):
    """A plain (unadapted) tiny Qwen2.5-VL folder: safetensors + config + tokenizer."""
    from napari_tghmoe.model.tiny import build_tiny_base_model

    folder = tmp_path_factory.mktemp("tiny-models") / "tiny-qwen2_5_vl"
    build_tiny_base_model(seed=0).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tuned_tghmoe_folder(tmp_path_factory, tiny_tokenizer):
    """A tiny TGH-MoE folder whose experts and LLM LoRA are non-zero (as if trained)."""
    import torch

    from napari_tghmoe.model.modeling import adapt_2d_mllm
    from napari_tghmoe.model.tiny import build_tiny_base_model

    model = adapt_2d_mllm(build_tiny_base_model(seed=1), {"volume_grid": list(TINY_VOLUME_GRID)})
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B = 0 at adaptation: make the experts and LoRA matter
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    folder = tmp_path_factory.mktemp("tiny-models") / "tiny-tghmoe"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


#: A small abdominal phantom (24 x 48 x 48): the docks' tests segment and ask about it.
SEGMENTATION_TEST_SHAPE = (24, 48, 48)


@pytest.fixture(scope="module")
def tiny_seg_model(tmp_path_factory):
    """Tiny random segmentation model on a coarse 12 mm grid: one 32^3 window per phantom (fast)."""
    from napari_tghmoe.med3d.encoder import build_tiny_seg_model

    folder = tmp_path_factory.mktemp("seg") / "tiny-seg"
    return build_tiny_seg_model(folder, working_spacing=[12.0, 12.0, 12.0], patch_size=[32, 32, 32])


@pytest.fixture(scope="module")
def phantom_volume():
    from napari_tghmoe.phantom import make_phantom

    return make_phantom(3, "abdomen", shape=SEGMENTATION_TEST_SHAPE).volume


def script_engine_answers(monkeypatch, engine, texts: list[str]) -> tuple[list[str], list]:
    """Let the real engine build its prompt and generate, then put the next of ``texts`` in its
    answer's place (the tiny model's own words are random). Returns (rendered prompts, volumes the
    model was shown), filled as questions are answered."""
    import dataclasses

    prompts: list[str] = []
    shown: list = []
    real_build, real_answer, real_prepare = engine.build_inputs, engine.answer, engine.prepare

    def build_inputs(*args, **kwargs):
        inputs = real_build(*args, **kwargs)
        prompts.append(inputs.prompt_text)
        return inputs

    def prepare(volume, spacing=None):
        shown.append(volume)
        return real_prepare(volume, spacing)

    def answer(volume, question, **kwargs):
        final = None
        for item in real_answer(volume, question, **kwargs):
            if not isinstance(item, str):
                final = item
        text = texts.pop(0)
        yield text
        yield dataclasses.replace(final, text=text)

    monkeypatch.setattr(engine, "build_inputs", build_inputs)
    monkeypatch.setattr(engine, "prepare", prepare)
    monkeypatch.setattr(engine, "answer", answer)
    return prompts, shown
