"""Memory-safe loading: estimate, free memory, and a clear refusal instead of an OOM kill."""

from __future__ import annotations

import pytest

from napari_tghmoe.model import memory
from napari_tghmoe.model.loading import GIB, LoadPlan, ModelLoadError, ParameterCounts, load_model

#: Qwen2.5-VL-3B: 2.78 B parameters in the decoder layers, 0.98 B elsewhere (embeddings, vision tower).
COUNTS_3B = ParameterCounts(llm=2_774_771_712, other=979_851_264)  # counted on the meta device


@pytest.fixture(scope="module")
def config_3b() -> dict:
    from napari_tghmoe.model.hf_layout import QWEN2_5_VL_3B, qwen_config_dict

    ids = dict.fromkeys(["bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id",
                         "vision_token_id", "image_token_id", "video_token_id"], 0)
    return qwen_config_dict(QWEN2_5_VL_3B, ids)


# ------------------------------------------------------------------ precisions and the estimate (pure)


@pytest.mark.parametrize(
    ("precision", "device", "plan"),
    [
        ("fp32", "cpu", LoadPlan("cpu", "none", "float32")),
        ("bf16", "cpu", LoadPlan("cpu", "none", "bfloat16")),
        ("int8", "cpu", LoadPlan("cpu", "8bit", "float32")),
        ("nf4", "cuda", LoadPlan("cuda", "4bit", "bfloat16")),
        ("auto", "cuda", LoadPlan("cuda", "4bit", "bfloat16")),
        ("auto", "cpu", LoadPlan("cpu", "none", "float32")),
    ],
)
def test_precision_names_map_to_load_plans_and_back(precision, device, plan):
    assert memory.plan_for_precision(precision, device, cuda_available=True) == plan
    if precision != "auto":
        assert memory.precision_of(plan) == precision


def test_unknown_precision_or_cuda_without_a_gpu_is_a_value_error():
    with pytest.raises(ValueError, match="precision"):
        memory.plan_for_precision("int3", "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        memory.plan_for_precision("nf4", "cuda", cuda_available=False)


def test_the_3b_estimate_orders_the_precisions_and_matches_the_weight_sizes(config_3b):
    sizes = {
        name: memory.estimate_for(config_3b, COUNTS_3B, memory.plan_for_precision(name, "cuda", cuda_available=True))
        for name in ("fp32", "bf16", "int8", "nf4")
    }
    totals = [sizes[n].total_bytes for n in ("fp32", "bf16", "int8", "nf4")]
    assert totals == sorted(totals, reverse=True)
    assert 13.5 * GIB < sizes["fp32"].weights_bytes < 14.5 * GIB  # 3.75 B x 4 bytes
    assert 6.8 * GIB < sizes["bf16"].weights_bytes < 7.2 * GIB
    assert 3.0 * GIB < sizes["nf4"].weights_bytes < 3.4 * GIB  # 2.78 B x 0.53 + 0.98 B x 2
    assert 0.2 * GIB < sizes["nf4"].runtime_bytes < 1.5 * GIB  # KV cache + activations + margin


def test_the_runtime_grows_with_the_volume_grid(config_3b):
    plan = LoadPlan("cpu", "none", "bfloat16")
    small = memory.runtime_bytes({**config_3b, "volume_grid": [16, 128, 128]}, plan)
    large = memory.runtime_bytes({**config_3b, "volume_grid": [64, 448, 448]}, plan)
    assert large > 4 * small


def test_a_report_that_does_not_fit_names_needed_free_and_what_would_fit(config_3b):
    plan = LoadPlan("cpu", "none", "float32")
    report = memory.fit_report("/models/qwen3b", config_3b, COUNTS_3B, plan, available=10 * GIB)
    assert not report.fits and report.precision == "fp32" and report.device == "cpu"
    assert report.needed_bytes > 14 * GIB
    assert "needs about" in report.message and "10.0 GiB free" in report.message
    assert report.alternatives == ("bf16", "int8", "nf4")
    assert "bf16 or int8 or nf4 would fit" in report.message

    tight = memory.fit_report("/m", config_3b, COUNTS_3B, plan, available=1 * GIB)
    assert tight.alternatives == () and "no precision fits" in tight.message
    roomy = memory.fit_report("/m", config_3b, COUNTS_3B, plan, available=64 * GIB)
    assert roomy.fits and roomy.message.startswith("fits:")
    unknown = memory.fit_report("/m", config_3b, COUNTS_3B, plan, available=None)
    assert unknown.fits and "unknown" in unknown.message


# ------------------------------------------------------------------ free memory


def test_available_cpu_memory_is_psutils_capped_by_the_cgroup(monkeypatch, tmp_path):
    import psutil

    free = memory.available_bytes("cpu")
    assert 0 < free <= psutil.virtual_memory().total

    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(str(3 * GIB))
    usage.write_text(str(2 * GIB))
    assert memory.cgroup_free_bytes(((str(limit), str(usage)),)) == GIB
    limit.write_text("max")
    assert memory.cgroup_free_bytes(((str(limit), str(usage)),)) is None
    assert memory.cgroup_free_bytes(((str(tmp_path / "none"), str(usage)),)) is None

    monkeypatch.setattr(memory, "cgroup_free_bytes", lambda: 123)
    assert memory.available_bytes("cpu") == 123


def test_cuda_free_memory_is_unknown_without_a_gpu():
    import torch

    if torch.cuda.is_available():  # pragma: no cover - the CI machine has none
        assert memory.available_bytes("cuda") > 0
    else:
        assert memory.available_bytes("cuda") is None


# ------------------------------------------------------------------ a real folder and the loader


def test_check_fits_on_a_tiny_folder(tuned_tghmoe_folder):
    needed = memory.estimate_load_bytes(tuned_tghmoe_folder, "fp32", "cpu")
    assert needed == memory.check_fits(tuned_tghmoe_folder, "fp32", "cpu", available=GIB).needed_bytes
    assert memory.estimate_load_bytes(tuned_tghmoe_folder, "bf16", "cpu") < needed

    fits = memory.check_fits(tuned_tghmoe_folder, "fp32", "cpu", available=needed)
    assert fits.fits and fits.model_dir == str(tuned_tghmoe_folder)
    short = memory.check_fits(tuned_tghmoe_folder, "fp32", "cpu", available=needed - 1)
    assert not short.fits and short.available_bytes == needed - 1

    options = memory.check_fits_for_options(tuned_tghmoe_folder, device="cpu", quantization="none", available=needed)
    assert options.fits and options.precision == "fp32"
    with pytest.raises(ModelLoadError, match="not found"):
        memory.check_fits(tuned_tghmoe_folder.parent / "missing", "fp32", "cpu")


def test_loading_refuses_a_model_that_does_not_fit_with_one_clear_line(tuned_tghmoe_folder, monkeypatch):
    from napari_tghmoe.engine import InferenceEngine

    needed = memory.estimate_load_bytes(tuned_tghmoe_folder, "fp32", "cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: needed - 1)
    with pytest.raises(ModelLoadError) as caught:
        InferenceEngine.from_pretrained(tuned_tghmoe_folder, device="cpu")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(tuned_tghmoe_folder))
    assert "not enough memory" in message and "fp32" in message
    assert f"{needed / GIB:.1f} GiB" in message and f"{(needed - 1) / GIB:.1f} GiB free" in message
    assert "bf16" in message  # what would fit instead

    # bf16 fits in the same memory, and loads
    engine = InferenceEngine.from_pretrained(tuned_tghmoe_folder, device="cpu", dtype="bf16", hash_weights=False)
    assert engine.info.memory.fits and engine.info.memory.precision == "bf16"


def test_memory_probe_and_opting_out(tuned_tghmoe_folder):
    with pytest.raises(ModelLoadError, match="not enough memory"):
        load_model(tuned_tghmoe_folder, device="cpu", memory_probe=lambda device: 1024)
    loaded = load_model(tuned_tghmoe_folder, device="cpu", memory_probe=lambda device: 1024, check_memory=False,
                        hash_weights=False)
    assert loaded.info.memory is None
    unknown = load_model(tuned_tghmoe_folder, device="cpu", memory_probe=lambda device: None, hash_weights=False)
    assert unknown.info.memory.fits and unknown.info.memory.available_bytes is None
