"""prepare_volume: CT windows, resampling, and the exact patch layout Qwen2.5-VL was trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_tghmoe.io import CTVolume
from napari_tghmoe.model.preprocess import (
    InputSettings,
    frames_to_patches,
    patches_to_frames,
    prepare_volume,
    resample_to_grid,
    round_grid,
)
from napari_tghmoe.model.tiny import TINY_SPECIAL_TOKENS, build_tiny_base_model, tiny_base_config


def settings(patch=8, tp=2, merge=2, grid=(8, 32, 48), depth_mm=None) -> InputSettings:
    return InputSettings(
        volume_grid=grid,
        ct_windows=((-600.0, 1500.0), (40.0, 400.0), (400.0, 1800.0)),
        image_mean=(0.0, 0.0, 0.0),
        image_std=(1.0, 1.0, 1.0),
        patch_size=patch,
        temporal_patch_size=tp,
        merge_size=merge,
        tokens_per_second=2.0,
        depth_mm_per_position=depth_mm,
    )


def tgh_config(**fields):
    from napari_tghmoe.model.configuration import TGHMoEConfig

    return TGHMoEConfig.from_base_config(tiny_base_config(), volume_grid=(8, 64, 64), **fields)


# ------------------------------------------------------------------ patch layout


def test_layout_equals_transformers_qwen2vl_image_processor_per_temporal_patch():
    """Each temporal patch of a video whose frame pairs are equal is one processor image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.random((3, 32, 48)).astype(np.float32) for _ in range(3)]
    frames = torch.from_numpy(np.stack([im for im in images for _ in range(2)]))  # (6, 3, 32, 48)

    patches, grid = frames_to_patches(frames, settings())

    assert grid == (3, 4, 6)
    per_t = grid[1] * grid[2]
    for t, image in enumerate(images):
        expected = processor(
            images=[image],
            do_resize=False,
            do_rescale=False,
            do_normalize=False,
            input_data_format="channels_first",
            return_tensors="np",
        )["pixel_values"]
        np.testing.assert_array_equal(patches[t * per_t : (t + 1) * per_t].numpy(), expected)


def test_rows_follow_the_documented_video_order_and_invert_exactly():
    """Row ((((t*(h/m)+hb)*(w/m)+wb)*m+hi)*m+wi) holds voxels (t*tp+j, c, hp*p+y, wp*p+x)."""
    s = settings()
    frames = torch.randn(8, 3, 32, 48)  # every frame different
    patches, (gt, gh, gw) = frames_to_patches(frames, s)
    p, tp, m = s.patch_size, s.temporal_patch_size, s.merge_size

    for t, hp, wp in [(0, 0, 0), (1, 3, 5), (3, 2, 1), (2, 1, 4)]:
        hb, hi, wb, wi = hp // m, hp % m, wp // m, wp % m
        row = (((t * (gh // m) + hb) * (gw // m) + wb) * m + hi) * m + wi
        block = frames[t * tp : (t + 1) * tp, :, hp * p : (hp + 1) * p, wp * p : (wp + 1) * p]
        expected = block.permute(1, 0, 2, 3).reshape(-1)  # (C, tp, p, p) flattened
        torch.testing.assert_close(patches[row], expected, rtol=0, atol=0)

    torch.testing.assert_close(patches_to_frames(patches, (gt, gh, gw), s), frames, rtol=0, atol=0)


def test_pretrained_patch_embedding_sees_the_volume_as_a_conv3d_over_it():
    """Qwen2.5-VL's Conv3d patch embedding on our rows == the same Conv3d run on the volume itself."""
    model = build_tiny_base_model()
    config = tgh_config()
    hu = np.random.default_rng(1).normal(0, 400, (8, 64, 64)).astype(np.float32)
    inputs = prepare_volume(hu, (1.0, 1.0, 1.0), config)
    embed = model.model.visual.patch_embed

    with torch.no_grad():
        tokens = embed(inputs.pixel_values_videos)
        frames = patches_to_frames(inputs.pixel_values_videos, tuple(inputs.video_grid_thw[0].tolist()), inputs.settings)
        volume = frames.permute(1, 0, 2, 3)[None]  # (1, C, D, H, W)
        direct = torch.nn.functional.conv3d(volume, embed.proj.weight, stride=embed.proj.stride)[0]

    gt, gh, gw = inputs.video_grid_thw[0].tolist()
    m = inputs.settings.merge_size
    for t, hp, wp in [(0, 0, 0), (3, 7, 7), (2, 5, 1)]:
        row = (((t * (gh // m) + hp // m) * (gw // m) + wp // m) * m + hp % m) * m + wp % m
        torch.testing.assert_close(tokens[row], direct[:, t, hp, wp], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ windows and resampling


def test_three_ct_windows_become_the_three_channels_then_processor_normalisation():
    config = tgh_config()
    hu = np.full((8, 64, 64), -600.0, dtype=np.float32)  # the lung window's centre
    inputs = prepare_volume(hu, (1.0, 1.0, 1.0), config)
    frames = patches_to_frames(inputs.pixel_values_videos, tuple(inputs.video_grid_thw[0].tolist()), inputs.settings)
    mean, std = np.array(config.image_mean), np.array(config.image_std)

    unit = frames.mean(dim=(0, 2, 3)).numpy() * std + mean  # undo normalisation per channel
    np.testing.assert_allclose(unit, [0.5, 0.0, 0.0], atol=1e-5)  # lung mid-grey, soft tissue and bone black

    bone = prepare_volume(np.full((8, 64, 64), 3000.0), (1, 1, 1), config)
    frames = patches_to_frames(bone.pixel_values_videos, tuple(bone.video_grid_thw[0].tolist()), bone.settings)
    np.testing.assert_allclose(frames.mean(dim=(0, 2, 3)).numpy() * std + mean, [1.0, 1.0, 1.0], atol=1e-5)


def test_whole_volume_is_resampled_to_the_config_grid():
    config = tgh_config()
    hu = np.zeros((37, 90, 70), dtype=np.int16)
    hu[:, :45, :] = 1000  # anterior half bright
    inputs = prepare_volume(hu, (1.0, 1.0, 1.0), config)

    assert inputs.model_grid == (8, 64, 64)
    assert tuple(inputs.video_grid_thw[0].tolist()) == (4, 8, 8)
    assert inputs.pixel_values_videos.shape == (4 * 8 * 8, 3 * 2 * 8 * 8)
    assert inputs.num_video_tokens == 64
    assert inputs.source_shape == (37, 90, 70)
    resampled = resample_to_grid(hu, (8, 64, 64))
    assert resampled[:, :30].min() == pytest.approx(1000.0)
    assert resampled[:, 34:].max() == pytest.approx(0.0)


def test_thin_bright_slab_survives_strong_depth_reduction():
    """Box averaging on shrinking axes: a 1-slice finding in 300 slices is not skipped over."""
    hu = np.full((300, 16, 16), -1000.0, dtype=np.float32)
    hu[151] = 1000.0
    resampled = resample_to_grid(hu, (32, 16, 16))
    assert resampled.max() > -1000.0 + 2000.0 / 12  # about one tenth of a bin, not zero
    assert resampled.mean().item() == pytest.approx(hu.mean(), abs=1.0)


def test_non_finite_voxels_become_air_and_integer_input_is_accepted():
    hu = np.zeros((8, 64, 64), dtype=np.float32)
    hu[0, 0, 0] = np.nan
    hu[1, 1, 1] = np.inf
    inputs = prepare_volume(hu, (1, 1, 1), tgh_config())
    assert torch.isfinite(inputs.pixel_values_videos).all()
    assert prepare_volume(np.nan_to_num(hu, posinf=0).astype(np.int16), (1, 1, 1), tgh_config()).pixel_values_videos.dtype == torch.float32


def test_grid_rounding_follows_patch_multiples():
    assert round_grid((32, 256, 256), 2, 28) == (32, 252, 252)
    assert round_grid((31, 10, 300), 2, 16) == (32, 16, 304)
    assert InputSettings.from_config(None).volume_grid == (32, 252, 252)  # Qwen2.5-VL: patch 14, merge 2
    assert InputSettings.from_config(tiny_base_config()).volume_grid == (32, 256, 256)  # patch 8


# ------------------------------------------------------------------ inputs and spacing


def test_ct_volume_supplies_its_own_spacing_and_arrays_need_one():
    config = tgh_config(depth_mm_per_position=5.0)
    hu = np.zeros((20, 64, 64), dtype=np.float32)
    from_volume = prepare_volume(CTVolume(hu, spacing=(2.5, 0.7, 0.7)), None, config)
    from_array = prepare_volume(hu, (2.5, 0.7, 0.7), config)
    torch.testing.assert_close(from_volume.second_per_grid_ts, from_array.second_per_grid_ts)
    assert from_volume.source_spacing == (2.5, 0.7, 0.7)
    with pytest.raises(ValueError, match="spacing"):
        prepare_volume(hu, None, config)
    with pytest.raises(ValueError, match="3D"):
        prepare_volume(hu[0], (1, 1), config)
    with pytest.raises(ValueError, match="positive"):
        prepare_volume(hu, (0, 1, 1), config)


def _temporal_positions(model, inputs) -> list[int]:
    n = inputs.num_video_tokens
    ids = [TINY_SPECIAL_TOKENS["vision_start"]] + [TINY_SPECIAL_TOKENS["video"]] * n + [4, 20, 21]
    input_ids = torch.tensor([ids])
    types = (input_ids == TINY_SPECIAL_TOKENS["video"]).int() * 2
    positions, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=types,
        video_grid_thw=inputs.video_grid_thw,
        second_per_grid_ts=inputs.second_per_grid_ts,
    )
    video = positions[0, 0, 1 : 1 + n]  # temporal axis of the video tokens
    return sorted(set(video.tolist()))


def test_depth_positions_follow_slice_spacing_in_millimetres():
    """Same slices at 1 mm and 5 mm: the 5 mm series spans five times the temporal positions."""
    model = build_tiny_base_model()
    config = tgh_config(depth_mm_per_position=2.0)
    hu = np.zeros((32, 64, 64), dtype=np.float32)
    thin = prepare_volume(hu, (1.0, 1.0, 1.0), config)  # 32 mm -> 8 mm per temporal patch
    thick = prepare_volume(hu, (5.0, 1.0, 1.0), config)  # 160 mm -> 40 mm per temporal patch

    thin_t, thick_t = _temporal_positions(model, thin), _temporal_positions(model, thick)
    assert thin_t != thick_t
    assert thin_t[1] - thin_t[0] == 4  # 8 mm / 2 mm per position
    assert thick_t[1] - thick_t[0] == 20  # 40 mm / 2 mm per position
    assert len(thin_t) == len(thick_t) == 4


def test_without_physical_depth_each_temporal_patch_is_one_position():
    model = build_tiny_base_model()
    inputs = prepare_volume(np.zeros((50, 64, 64)), (3.0, 1.0, 1.0), tgh_config())
    first = _temporal_positions(model, inputs)
    assert [p - first[0] for p in first] == [0, 1, 2, 3]


# ------------------------------------------------------------------ intensity kinds (HU vs [0, 1])


def _channel_means(inputs) -> np.ndarray:
    """Per-channel mean of the model input with the processor's mean/std undone: what each channel saw in [0, 1]."""
    frames = patches_to_frames(inputs.pixel_values_videos, tuple(inputs.video_grid_thw[0].tolist()), inputs.settings)
    mean, std = np.array(inputs.settings.image_mean), np.array(inputs.settings.image_std)
    return frames.mean(dim=(0, 2, 3)).numpy() * std + mean


def _unit_volume(value: float) -> CTVolume:
    return CTVolume(np.full((8, 64, 64), value, dtype=np.float32), spacing=(5.0, 1.5, 1.5), metadata={"intensity": "unit"})


def test_unit_volume_to_an_hu_model_goes_through_the_soft_tissue_window_explicitly():
    """An M3D [0, 1] volume is not read as HU (0.7 HU would be one grey in every channel): it is
    mapped back on the soft-tissue window, so that channel sees it unchanged."""
    inputs = prepare_volume(_unit_volume(0.7), None, tgh_config())
    lung, soft, bone = _channel_means(inputs)
    assert soft == pytest.approx(0.7, abs=1e-5)
    hu = -160.0 + 0.7 * 400.0  # 120 HU
    assert lung == pytest.approx((hu + 1350.0) / 1500.0, abs=1e-5) and bone == pytest.approx((hu + 500.0) / 1800.0, abs=1e-5)
    assert inputs.intensity.kind == "unit" and not inputs.intensity.guessed
    assert inputs.settings.input_intensity == "hu" and inputs.intensity_mismatch


def test_a_unit_model_sees_unit_volumes_as_grey_and_hu_volumes_windowed_and_min_max_normalised():
    config = tgh_config(input_intensity="unit")
    assert config.input_intensity == "unit"
    grey = prepare_volume(_unit_volume(0.3), None, config)
    np.testing.assert_allclose(_channel_means(grey), [0.3, 0.3, 0.3], atol=1e-5)
    assert not grey.intensity_mismatch

    hu = np.full((8, 64, 64), 40.0, dtype=np.float32)  # soft tissue at the window's centre
    hu[:, :32] = -1000.0  # air: the window's floor, the volume's minimum
    hu[:, 32:40] = 1000.0  # bone: the window's ceiling, the volume's maximum
    inputs = prepare_volume(CTVolume(hu, spacing=(1.0, 1.0, 1.0), metadata={"intensity": "hu"}), None, config)
    frames = patches_to_frames(inputs.pixel_values_videos, tuple(inputs.video_grid_thw[0].tolist()), inputs.settings)
    unit = frames * torch.tensor(config.image_std).view(1, 3, 1, 1) + torch.tensor(config.image_mean).view(1, 3, 1, 1)
    assert torch.allclose(unit[:, :, :32], torch.tensor(0.0), atol=1e-5)
    assert torch.allclose(unit[:, :, 32:40], torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(unit[:, :, 40:], torch.tensor(0.5), atol=1e-5)
    assert inputs.intensity.kind == "hu" and inputs.intensity_mismatch


def test_the_kind_is_read_from_metadata_else_guessed_from_the_values():
    from napari_tghmoe.model.preprocess import volume_intensity

    rng = np.random.default_rng(0)
    display = rng.random((8, 16, 16)).astype(np.float32)  # a float NIfTI in [0, 1]
    guessed = volume_intensity(CTVolume(display))
    assert guessed.kind == "unit" and guessed.guessed and "not in HU" in guessed.reason
    assert prepare_volume(display, (1, 1, 1), tgh_config()).intensity.kind == "unit"
    assert volume_intensity(CTVolume(display * 1000.0 - 1000.0)).kind == "hu"
    assert volume_intensity(np.zeros((4, 8, 8), dtype=np.float32)).kind == "hu"  # constant: no evidence
    assert volume_intensity(np.ones((4, 8, 8), dtype=np.int16)).kind == "hu"  # integers are stored HU
    assert volume_intensity(CTVolume(display, metadata={"intensity": "hu"})).kind == "hu"  # the loader's word wins
    with pytest.raises(ValueError, match="intensity kind must be one of"):
        tgh_config(input_intensity="rgb")
    assert prepare_volume(display, (1, 1, 1), tgh_config(), intensity="hu").intensity.kind == "hu"


def test_a_config_without_the_field_was_trained_on_hu(tmp_path):
    """Model folders written before ``input_intensity`` existed (the first bundled demo) are HU models."""
    import json
    from pathlib import Path

    from napari_tghmoe.model.configuration import TGHMoEConfig

    demo = Path(__file__).resolve().parents[1] / "resources" / "demo-model" / "config.json"
    values = json.loads(demo.read_text())
    values.pop("input_intensity", None)
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert TGHMoEConfig.from_pretrained(tmp_path, local_files_only=True).input_intensity == "hu"
    assert InputSettings.from_config(tiny_base_config()).input_intensity == "hu"  # a plain Qwen2.5-VL config


# ------------------------------------------------------------------ a model folder's own processor files


def write_json(path, data) -> None:
    import json

    path.write_text(json.dumps(data))


def test_processor_settings_come_from_the_video_processor_first_then_the_image_processor(tmp_path):
    from napari_tghmoe.model.preprocess import read_processor_settings

    assert read_processor_settings(tmp_path) is None
    write_json(tmp_path / "preprocessor_config.json", {
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136, "max_pixels": 12845056,
        "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6],
    })
    image_only = read_processor_settings(tmp_path)
    assert image_only.sources == ("preprocessor_config.json",)
    assert (image_only.image_mean, image_only.min_pixels) == ((0.1, 0.2, 0.3), 3136)

    write_json(tmp_path / "video_preprocessor_config.json", {
        "patch_size": 14, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
        "size": {"shortest_edge": 1024, "longest_edge": 65536},
    })
    both = read_processor_settings(tmp_path)
    assert both.sources == ("video_preprocessor_config.json", "preprocessor_config.json")
    assert both.image_mean == (0.5, 0.5, 0.5) and both.image_std == (0.25, 0.25, 0.25)  # the video's
    assert (both.min_pixels, both.max_pixels) == (1024, 65536)  # Qwen's size dict counts pixels
    assert (both.temporal_patch_size, both.merge_size) == (2, 2)  # missing in the video file: the image's

    write_json(tmp_path / "video_preprocessor_config.json", {"do_normalize": False, "image_mean": [9, 9, 9]})
    assert read_processor_settings(tmp_path).image_std == (1.0, 1.0, 1.0)  # no normalisation at all


@pytest.mark.parametrize(
    ("content", "reason"),
    [("{broken", "not valid JSON"), ("[1, 2]", "not a JSON object"), ('{"image_mean": [0.5, 0.5]}', "3 values"),
     ('{"patch_size": "big"}', "invalid value"), ('{"image_std": [0, 1, 1]}', "positive")],
)
def test_a_bad_processor_file_is_named(tmp_path, content, reason):
    from napari_tghmoe.model.preprocess import ProcessorConfigError, read_processor_settings

    (tmp_path / "preprocessor_config.json").write_text(content)
    with pytest.raises(ProcessorConfigError, match=reason) as caught:
        read_processor_settings(tmp_path)
    assert str(caught.value).startswith("preprocessor_config.json: ")


def test_processor_values_go_onto_the_config_and_patch_sizes_must_match_the_tower():
    from napari_tghmoe.model.preprocess import (
        ProcessorConfigError,
        ProcessorSettings,
        apply_processor_settings,
    )

    config = tiny_base_config(patch_size=8)
    settings = ProcessorSettings(("video_preprocessor_config.json",), patch_size=8, temporal_patch_size=2,
                                 merge_size=2, image_mean=(0.5, 0.5, 0.5), image_std=(0.2, 0.2, 0.2),
                                 min_pixels=256, max_pixels=4096)
    assert apply_processor_settings(config, settings) == []  # a plain config had no mean to replace
    resolved = InputSettings.from_config(config, volume_grid=(8, 128, 128))
    assert resolved.image_mean == (0.5, 0.5, 0.5) and resolved.image_std == (0.2, 0.2, 0.2)
    assert resolved.volume_grid == (8, 64, 64)  # 128 x 128 is over max_pixels 4096: resized like Qwen's

    tgh = tgh_config()
    notes = apply_processor_settings(tgh, ProcessorSettings(("preprocessor_config.json",), image_mean=(0.5, 0.5, 0.5)))
    assert len(notes) == 1 and "image_mean" in notes[0] and tgh.image_mean == [0.5, 0.5, 0.5]

    with pytest.raises(ProcessorConfigError, match="patch_size 14 does not match the vision tower's patch_size 8"):
        apply_processor_settings(config, ProcessorSettings(("preprocessor_config.json",), patch_size=14))
    with pytest.raises(ProcessorConfigError, match="merge_size 4"):
        apply_processor_settings(config, ProcessorSettings(("preprocessor_config.json",), merge_size=4))


def test_frames_are_resized_into_the_pixel_limits_as_qwen_does():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from napari_tghmoe.model.preprocess import fit_frame_pixels

    assert fit_frame_pixels(252, 252, 28, 3136, 12845056) == (252, 252)  # inside: unchanged
    assert fit_frame_pixels(252, 504, 28, None, 200 * 28 * 28) == smart_resize(252, 504, 28, 56 * 56, 200 * 28 * 28)
    height, width = fit_frame_pixels(252, 504, 28, None, 200 * 28 * 28)
    assert height * width <= 200 * 28 * 28 and height % 28 == 0 and width % 28 == 0
    assert fit_frame_pixels(28, 28, 28, 56 * 56 * 4, None) == (112, 112)  # below min_pixels: enlarged


def test_one_table_of_ct_windows_for_the_viewer_the_model_and_m3d_intensities():
    """"Soft tissue" is the same window in the viewer's presets, the model's green channel and the
    HU <-> [0, 1] mapping of M3D volumes; lung and bone likewise."""
    from napari_tghmoe.ct_windows import BONE, LUNG, SOFT_TISSUE
    from napari_tghmoe.layers import WINDOW_PRESETS
    from napari_tghmoe.model.configuration import TGHMoEConfig
    from napari_tghmoe.model.preprocess import DEFAULT_CT_WINDOWS, UNIT_DISPLAY_WINDOW

    assert DEFAULT_CT_WINDOWS == (LUNG, SOFT_TISSUE, BONE) and UNIT_DISPLAY_WINDOW == SOFT_TISSUE
    for name, window in (("lung", LUNG), ("soft tissue", SOFT_TISSUE), ("bone", BONE)):
        assert (WINDOW_PRESETS[name].level, WINDOW_PRESETS[name].width) == window
    assert [tuple(w) for w in TGHMoEConfig().ct_windows] == list(DEFAULT_CT_WINDOWS)

