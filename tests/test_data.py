"""Training/evaluation data: loaders for each format, the phantom cache, phrasings, collation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from napari_tghmoe.io import CTVolume, VolumeReadError, write_nifti
from napari_tghmoe.train import data as D
from napari_tghmoe.datasets import phrasings as P


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TGHMOE_CACHE_DIR", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- M3D-Cap


def _m3d_npy(path: Path, value: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((1, 4, 16, 16), value, dtype=np.float32)  # M3D ships (1, 32, 256, 256)
    image[0, :, 4:12, 4:12] = 1.0
    np.save(path, image)
    return path


def test_m3d_cap_case_folders_pair_each_npy_with_its_caption(tmp_path):
    root = tmp_path / "M3D_Cap_npy"
    _m3d_npy(root / "ct_case" / "000001" / "Axial_C__portal_venous_phase.npy", 0.0)
    _m3d_npy(root / "ct_case" / "000001" / "Coronal_non_contrast.npy", 0.5)
    (root / "ct_case" / "000001" / "text.txt").write_text("Hepatic cyst in segment 4.\n")
    _m3d_npy(root / "ct_case" / "000002" / "Axial_non_contrast.npy", 0.25)
    (root / "ct_case" / "000002" / "text.txt").write_text("Normal study.")

    samples = D.load_m3d_cap(root)

    assert [s.target for s in samples] == ["Hepatic cyst in segment 4.", "Hepatic cyst in segment 4.", "Normal study."]
    assert all(s.task == "report" and s.prompt == P.REPORT_TRAIN[0] for s in samples)
    volume = D.load_sample_volume(samples[0])
    assert volume.shape == (4, 16, 16)
    assert volume.spacing == D.M3D_NOMINAL_SPACING


def test_m3d_volumes_stay_unit_intensities_and_say_so(tmp_path):
    """M3D's [0, 1] display intensities are not HU: no pseudo-HU at load time; the kind travels
    on the sample and on the volume, and the preprocessing maps it explicitly."""
    root = tmp_path / "M3D_Cap_npy"
    _m3d_npy(root / "case" / "axial.npy", 0.25)
    (root / "case" / "text.txt").write_text("Normal study.")
    (sample,) = D.load_m3d_cap(root)
    assert sample.meta["intensity"] == "unit"
    volume = D.load_sample_volume(sample)
    assert volume.metadata["intensity"] == "unit"
    assert volume.hu[0, 0, 0] == pytest.approx(0.25) and volume.hu[0, 8, 8] == pytest.approx(1.0)
    # an array sample says its kind through meta; "normalized" (the old spelling) is read as unit
    array = D.Sample(np.full((4, 8, 8), 0.5, np.float32), "Describe.", "x", "report", meta={"intensity": "normalized"})
    loaded = D.load_sample_volume(array)
    assert loaded.metadata["intensity"] == "unit" and float(loaded.hu.max()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="intensity kind must be one of"):
        D.load_sample_volume(D.Sample(np.zeros((4, 8, 8)), "Describe.", "x", "report", meta={"intensity": "bogus"}))


def test_a_model_is_trained_on_the_intensity_kind_most_of_its_samples_hold(tmp_path):
    unit = [D.Sample(str(tmp_path / f"{i}.npy"), "Describe.", "x", "report", meta={"intensity": "unit"}) for i in range(3)]
    hu = [D.Sample(str(tmp_path / f"{i}.nii.gz"), "Describe.", "x", "report", meta={"intensity": "hu"}) for i in range(2)]
    assert D.samples_intensity(unit + hu) == "unit"
    assert D.samples_intensity(unit[:2] + hu) == "hu"  # a tie keeps HU
    assert D.samples_intensity(D.load_phantoms([1], "chest", shape=(8, 48, 48))) == "hu"
    bare_npy = D.Sample(str(tmp_path / "x.npy"), "Describe.", "x", "report")  # M3D by its suffix
    assert D.samples_intensity([bare_npy]) == "unit"


def test_m3d_cap_json_index_selects_the_split(tmp_path):
    root = tmp_path / "cap"
    _m3d_npy(root / "a" / "img.npy", 0.1)
    _m3d_npy(root / "b" / "img.npy", 0.2)
    (root / "a" / "text.txt").write_text("train caption")
    (root / "b" / "text.txt").write_text("test caption")
    index = {"train": [{"image": "a/img.npy", "text": "a/text.txt"}], "test": [{"image": "b/img.npy", "text": "b/text.txt"}]}
    (root / "M3D_Cap.json").write_text(json.dumps(index))

    assert [s.target for s in D.load_m3d_cap(root, split="test")] == ["test caption"]
    assert [s.target for s in D.load_m3d_cap(root, split="train")] == ["train caption"]
    with pytest.raises(VolumeReadError, match="M3D_Cap.json.*no split 'validation'"):
        D.load_m3d_cap(root, split="validation")


def test_a_bad_m3d_array_names_the_file(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3), dtype=np.float32))
    sample = D.Sample(str(bad), "Describe.", "x", "report", meta={"intensity": "normalized"})
    with pytest.raises(VolumeReadError, match=r"bad\.npy: expected a \(1, D, H, W\)"):
        D.load_sample_volume(sample)


# --------------------------------------------------------------------------- M3D-VQA

VQA_COLUMNS = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "Answer Choice"]


def _write_vqa_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=VQA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_m3d_vqa_closed_prompt_and_target_are_exactly_m3d(tmp_path):
    _m3d_npy(tmp_path / "data" / "M3D_Cap_npy" / "case1" / "axial.npy", 0.3)
    row = {
        "Image Path": "M3D_Cap_npy/case1/axial.npy",
        "Text": "",
        "Question Type": "3",
        "Question": "Which organ shows a lesion?",
        "Choice A": "lung",
        "Choice B": "liver",
        "Choice C": "kidney",
        "Choice D": "spleen",
        "Answer": "liver",
        "Answer Choice": "B",
    }
    csv_path = _write_vqa_csv(tmp_path / "data" / "M3D-VQA" / "M3D_VQA_test.csv", [row, {**row, "Question Type": "Plane"}])

    samples = D.load_m3d_vqa(csv_path, mode="both")

    closed, opened, closed2, _ = samples
    assert closed.task == "vqa_closed" and opened.task == "vqa_open"
    assert closed.prompt == "Which organ shows a lesion? Choices: A. lung B. liver C. kidney D. spleen"
    assert closed.target == "B. liver"
    assert opened.prompt == "Which organ shows a lesion?" and opened.target == "liver"
    assert closed.qtype == "organ" and closed2.qtype == "plane"  # numeric type 3 = organ (M3D order)
    assert closed.meta["answer_letter"] == "B" and closed.meta["choices"] == ["lung", "liver", "kidney", "spleen"]
    # "Image Path" is relative to the data root two levels above the CSV, found automatically.
    assert D.load_sample_volume(closed).shape == (4, 16, 16)
    assert [s.task for s in D.load_m3d_vqa(csv_path, mode="closed")] == ["vqa_closed", "vqa_closed"]


def test_m3d_vqa_with_missing_columns_names_the_csv(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text("Image Path,Question\nx.npy,What?\n")
    with pytest.raises(VolumeReadError, match=r"broken\.csv: not an M3D-VQA CSV: missing columns"):
        D.load_m3d_vqa(path)


# --------------------------------------------------------------------------- CT-RATE


def test_ct_rate_pairs_nifti_volumes_with_their_report_rows(tmp_path):
    root = tmp_path / "CT-RATE"
    hu = np.arange(4 * 12 * 12, dtype=np.int16).reshape(4, 12, 12) % 200  # stored without rescale
    write_nifti(CTVolume(hu=hu, spacing=(3.0, 0.8, 0.8)), root / "valid" / "valid_1" / "valid_1_a" / "valid_1_a_1.nii.gz")
    reports = root / "radiology_text_reports" / "validation_reports.csv"
    reports.parent.mkdir(parents=True)
    with reports.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"])
        writer.writerow(["valid_1_a_1.nii.gz", "Cough.", "Non-contrast chest CT.", "Lungs are clear.", "Normal chest CT."])
        writer.writerow(["valid_9_a_1.nii.gz", "", "", "Not on disk.", "Skip me."])
    metadata = root / "metadata" / "validation_metadata.csv"
    metadata.parent.mkdir(parents=True)
    metadata.write_text("VolumeName,RescaleSlope,RescaleIntercept\nvalid_1_a_1.nii.gz,1,-1024\n")

    samples = D.load_ct_rate(root)

    assert len(samples) == 1
    (sample,) = samples
    assert sample.target == "Findings: Lungs are clear.\nImpression: Normal chest CT."
    assert sample.task == "report" and sample.meta["rescale"] == [1.0, -1024.0]
    volume = D.load_sample_volume(sample)
    assert volume.shape == (4, 12, 12) and volume.spacing == pytest.approx((3.0, 0.8, 0.8))
    assert float(volume.hu.min()) == pytest.approx(-1024.0)  # the rescale was applied
    assert sample.meta["intensity"] == "hu" and volume.metadata["intensity"] == "hu"
    assert D.load_ct_rate(root, target="findings")[0].target == "Lungs are clear."


# --------------------------------------------------------------------------- phantoms


def test_phantoms_are_generated_once_and_read_back_from_the_cache(tmp_path):
    from napari_tghmoe.phantom import make_phantom

    cache = tmp_path / "phantoms"
    samples = D.load_phantoms([5], "abdomen", shape=(8, 48, 48), cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = D.load_phantoms([5], "abdomen", shape=(8, 48, 48), cache_dir=cache)
    assert files[0].stat().st_mtime_ns == stamp  # read, not regenerated
    assert [s.target for s in again] == [s.target for s in samples]

    phantom = make_phantom(5, region="abdomen", shape=(8, 48, 48), plane=None)  # the cache draws the plane from the seed
    report = samples[0]
    assert report.task == "report" and report.target == phantom.report
    assert report.meta["findings"] == [
        {"kind": f.kind, "organ": f.organ, "location": f.location, "size_mm": float(f.size_mm),
         "center_voxel": list(f.center_voxel), "mean_hu": float(f.mean_hu)}
        for f in phantom.findings
    ]
    volume = D.load_sample_volume(report)
    np.testing.assert_array_equal(volume.hu, phantom.volume.hu)
    assert volume.spacing == pytest.approx(phantom.volume.spacing)
    closed = [s for s in samples if s.task == "vqa_closed"]
    opened = [s for s in samples if s.task == "vqa_open"]
    assert len(closed) == len(opened) == len(phantom.vqa)
    item = phantom.vqa[0]
    assert closed[0].target == f"{item.answer_letter}. {item.answer_text}" and opened[0].target == item.answer_text
    assert closed[0].prompt.endswith(" Choices: " + " ".join(f"{l}. {c}" for l, c in zip("ABCD", item.choices)))


def test_the_cache_carries_the_lesion_mask_to_the_volume_and_regenerates_files_without_it(tmp_path):
    """The vision probe's targets come from ``Phantom.lesions``: the cache keeps it, the loaded
    volume carries it, and a file of the old format (no mask) is regenerated, not misread."""
    from napari_tghmoe.phantom import make_phantom

    phantom = make_phantom(2, region="chest", shape=(16, 48, 64))
    assert phantom.lesions.any()
    path, cached = D.cached_phantom(2, "chest", (16, 48, 64), None, tmp_path)
    np.testing.assert_array_equal(cached.lesions, phantom.lesions)
    volume = D.load_sample_volume(D.load_phantoms([2], "chest", shape=(16, 48, 64), cache_dir=tmp_path)[0])
    np.testing.assert_array_equal(volume.metadata["phantom_lesions"], phantom.lesions)
    assert volume.metadata["intensity"] == "hu"

    with np.load(path, allow_pickle=False) as data:
        old = {"hu": data["hu"], "meta": data["meta"]}
    np.savez_compressed(path, **old)  # what format 1 wrote
    with pytest.raises(VolumeReadError, match="not a phantom cache file of format 2"):
        D.read_phantom_cache(path)
    _, again = D.cached_phantom(2, "chest", (16, 48, 64), None, tmp_path)
    np.testing.assert_array_equal(again.lesions, phantom.lesions)


def test_the_cache_key_names_the_cache_format(tmp_path, monkeypatch):
    before = D.phantom_cache_path(1, "chest", (8, 48, 48), None, tmp_path)
    from napari_tghmoe.datasets import phantom as phantom_source  # where the cache key is built

    monkeypatch.setattr(phantom_source, "PHANTOM_CACHE_FORMAT", D.PHANTOM_CACHE_FORMAT + 1)
    assert D.phantom_cache_path(1, "chest", (8, 48, 48), None, tmp_path) != before


def test_the_cache_key_separates_seed_region_and_grid(tmp_path):
    paths = {
        D.phantom_cache_path(1, "chest", (8, 48, 48), None, tmp_path),
        D.phantom_cache_path(2, "chest", (8, 48, 48), None, tmp_path),
        D.phantom_cache_path(1, "abdomen", (8, 48, 48), None, tmp_path),
        D.phantom_cache_path(1, "chest", (8, 64, 64), None, tmp_path),
        D.phantom_cache_path(1, "chest", None, (5.0, 1.0, 1.0), tmp_path),
    }
    assert len(paths) == 5
    assert D.phantom_cache_path(1, "chest", (8, 48, 48), None, tmp_path) in paths  # deterministic


def test_a_damaged_cache_file_is_regenerated(tmp_path):
    path = D.phantom_cache_path(7, "chest", (8, 48, 48), None, tmp_path)
    path.write_bytes(b"not an npz")
    _, cached = D.cached_phantom(7, "chest", (8, 48, 48), None, tmp_path)
    assert cached.seed == 7 and cached.volume.shape == (8, 48, 48)


# --------------------------------------------------------------------------- phrasings


def test_held_out_phrasings_never_appear_in_training():
    normalise = lambda text: " ".join(text.lower().split())  # noqa: E731
    train_reports = {normalise(p) for p in P.REPORT_TRAIN}
    assert not train_reports & {normalise(p) for p in P.REPORT_HELDOUT}
    assert not {normalise(p) for p in P.QUESTION_TRAIN} & {normalise(p) for p in P.QUESTION_HELDOUT}
    from napari_tghmoe.model.prompts import REPORT_PROMPTS

    assert set(REPORT_PROMPTS) <= set(P.REPORT_TRAIN)  # what the engine sends is always trained
    assert len(P.REPORT_TRAIN) >= 20 and len(P.REPORT_HELDOUT) >= 5


def test_held_out_style_uses_only_held_out_wordings():
    samples = D.load_phantoms(range(3), "both", shape=(8, 48, 48), phrasing="heldout")
    reports = [s.prompt for s in samples if s.task == "report"]
    assert set(reports) <= set(P.REPORT_HELDOUT)
    opened = [s for s in samples if s.task == "vqa_open"]
    heldout_forms = [P.apply_question_template(t, s.meta["question"]) for s in opened for t in P.QUESTION_HELDOUT]
    assert all(s.prompt in heldout_forms for s in opened)
    assert any(s.prompt != s.meta["question"] for s in opened)  # questions really are reframed


def test_question_templates_keep_the_question_and_phrasing_files_load(tmp_path):
    assert P.apply_question_template("Based on the scan, {question_lc}", "Which organ?") == "Based on the scan, which organ?"
    assert P.apply_question_template("Based on the scan, {question_lc}", "CT phase?") == "Based on the scan, CT phase?"
    listing = tmp_path / "mine.txt"
    listing.write_text("# my wordings\nReport this.\n\nSummarise the scan.\n")
    assert P.get_phrasings(listing) == ("Report this.", "Summarise the scan.")
    with pytest.raises(ValueError, match="unknown phrasing list"):
        P.get_phrasings("no_such_list")


# --------------------------------------------------------------------------- specs


def test_dataset_specs_select_source_and_task(tmp_path):
    samples = D.load_dataset_spec("phantom:seeds=1-2,region=chest,shape=8x48x48", task="vqa_closed")
    assert samples and {s.task for s in samples} == {"vqa_closed"} and {s.meta["seed"] for s in samples} == {1, 2}
    assert D.parse_seed_range("1000-1003+7") == [1000, 1001, 1002, 1003, 7]
    assert len(D.load_dataset_spec("phantom:seeds=1-2,region=chest,shape=8x48x48", task="report", limit=1)) == 1
    with pytest.raises(ValueError, match="unknown data kind 'mnist'"):
        D.load_dataset_spec("mnist:/x")
    with pytest.raises(ValueError, match="unknown option"):
        D.load_dataset_spec("phantom:seeds=1,colour=red")


# --------------------------------------------------------------------------- collation


@pytest.fixture(scope="module")
def tokenizer_and_config():
    from napari_tghmoe.model.tiny import tiny_base_config
    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS, build_tokenizer

    tokenizer = build_tokenizer(list(DEFAULT_CORPUS) + list(P.REPORT_TRAIN), vocab_size=512)
    config = tiny_base_config()
    config.volume_grid = (8, 64, 64)  # 64 video tokens per volume (4 x 8 x 8 patches, 2x2 merge)
    config.group_names = ["shared", "report", "vqa_closed", "vqa_open"]
    return tokenizer, config


def _volume_sample(prompt: str, target: str, task: str, seed: int) -> D.Sample:
    hu = np.random.default_rng(seed).normal(0, 100, (8, 32, 32)).astype(np.float32)
    return D.Sample(hu, prompt, target, task, meta={"spacing": (5.0, 1.0, 1.0)})


def test_collation_masks_prompt_and_padding_out_of_the_labels(tokenizer_and_config):
    tokenizer, config = tokenizer_and_config
    short = _volume_sample("Which organ? Choices: A. lung B. liver C. kidney D. spleen", "B. liver", "vqa_closed", 0)
    long = _volume_sample("Describe the findings.", "The lungs are clear. No pleural effusion.", "report", 1)

    batch = D.collate([short, long], tokenizer, config)

    from napari_tghmoe.model.tiny import TINY_SPECIAL_TOKENS as T

    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    eos = tokenizer.eos_token_id
    for row, sample in enumerate([short, long]):
        target_ids = tokenizer(sample.target, add_special_tokens=False)["input_ids"] + [eos]
        length = int(attention[row].sum())
        prompt_length = length - len(target_ids)
        # The target and end-of-turn are learned; everything before (chat, vision, question) is not.
        assert labels[row, :prompt_length].eq(-100).all()
        assert labels[row, prompt_length:length].tolist() == target_ids
        assert ids[row, prompt_length:length].tolist() == target_ids
        # Padding (right side): not attended, not learned.
        assert attention[row, length:].eq(0).all() and labels[row, length:].eq(-100).all()
        assert ids[row, length:].eq(tokenizer.pad_token_id).all()
        # Vision placeholder expanded: start, 64 video tokens, end, all before the question.
        video = (ids[row] == T["video"]).nonzero().flatten()
        assert len(video) == 64 and int(video[-1] - video[0]) == 63
        assert ids[row, video[0] - 1] == T["vision_start"] and ids[row, video[-1] + 1] == T["vision_end"]
        assert batch["mm_token_type_ids"][row].eq(2).sum() == 64
    assert int(attention[0].sum()) < int(attention[1].sum())  # the short row really was padded
    # The text router sees the instruction only: not the chat boilerplate, vision or the answer.
    assert tokenizer.decode(ids[0][batch["text_guidance_mask"][0]]) == short.prompt
    assert not (batch["text_guidance_mask"] & (labels != -100)).any()
    assert batch["task_labels"].tolist() == [2, 1]  # index in group_names
    assert batch["pixel_values_videos"].shape == (2 * 256, 3 * 2 * 8 * 8)
    assert batch["video_grid_thw"].tolist() == [[4, 8, 8], [4, 8, 8]]
    assert batch["second_per_grid_ts"].shape == (2,)


def test_collation_sends_what_the_engine_sends(tokenizer_and_config):
    from napari_tghmoe.model.prompts import REPORT_PROMPTS

    tokenizer, config = tokenizer_and_config
    batch = D.collate([_volume_sample("Write the report.", "Normal.", "report", 0)], tokenizer, config)
    # "Write the report." is a report request: the engine replaces it by its report template.
    assert tokenizer.decode(batch["input_ids"][0][batch["text_guidance_mask"][0]]) == REPORT_PROMPTS[0]
    verbatim = D.collate([_volume_sample("Write the report.", "Normal.", "report", 0)], tokenizer, config, rewrite_like_engine=False)
    assert tokenizer.decode(verbatim["input_ids"][0][verbatim["text_guidance_mask"][0]]) == "Write the report."


def test_max_length_truncates_the_target_only(tokenizer_and_config):
    tokenizer, config = tokenizer_and_config
    sample = _volume_sample("Describe the findings.", "The lungs are clear. No pleural effusion.", "report", 0)
    full = D.collate([sample], tokenizer, config)
    length = full["input_ids"].shape[1]
    cut = D.collate([sample], tokenizer, config, max_length=length - 3)
    assert cut["input_ids"].shape[1] == length - 3
    assert cut["input_ids"][0].tolist() == full["input_ids"][0, : length - 3].tolist()
    with pytest.raises(ValueError, match="the prompt alone has"):
        D.collate([sample], tokenizer, config, max_length=10)


def test_collated_batch_trains_the_tghmoe_model(tokenizer_and_config):
    import torch

    from napari_tghmoe.model.modeling import adapt_2d_mllm
    from napari_tghmoe.model.tiny import build_tiny_base_model

    tokenizer, _ = tokenizer_and_config
    model = adapt_2d_mllm(build_tiny_base_model(seed=0), {"volume_grid": [8, 64, 64], "experts_per_group": 2, "lora_rank": 4})
    samples = [
        _volume_sample("Which organ? Choices: A. lung B. liver C. kidney D. spleen", "B. liver", "vqa_closed", 0),
        _volume_sample("Describe the findings.", "The lungs are clear.", "report", 1),
    ]
    batch = D.collate(samples, tokenizer, model.config)
    output = model(**batch)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_a_model_trained_on_m3d_volumes_records_unit_intensities_and_its_card_says_so(tmp_path, monkeypatch):
    """The trainer writes ``input_intensity`` from its data; the card prints it."""
    pytest.importorskip("torch")
    from napari_tghmoe.train.card import input_intensity_line
    from napari_tghmoe.train.cli import load_recipe_with_overrides
    from napari_tghmoe.train.trainer import train

    monkeypatch.setenv("TGHMOE_TRAIN_THREADS", "1")
    root = tmp_path / "M3D_Cap_npy"
    for case, value in (("a", 0.2), ("b", 0.6)):
        _m3d_npy(root / case / "axial.npy", value)
        (root / case / "text.txt").write_text(f"Case {case}: normal study.")
    samples = D.load_m3d_cap(root)
    recipe = load_recipe_with_overrides(
        str(Path(__file__).resolve().parents[1] / "recipes" / "tiny-test.toml"),
        ["stage1.steps=1", "stage1.save_every=1", "stage1.gradient_accumulation_steps=1"],
    )
    train(recipe, 1, tmp_path / "run", progress=False, samples=samples)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["input_intensity"] == "unit"
    assert "**unit**" in input_intensity_line(config)
    assert "**hu**" in input_intensity_line({})  # a folder written before the field: trained on HU


# --------------------------------------------------------------------------- the image-free control and the stored plane


def test_zero_image_zeroes_the_pixels_and_nothing_else(tokenizer_and_config):
    tokenizer, config = tokenizer_and_config
    samples = [
        _volume_sample("Which organ? Choices: A. lung B. liver C. kidney D. spleen", "B. liver", "vqa_closed", 0),
        _volume_sample("Describe the findings.", "The lungs are clear.", "report", 1),
    ]
    seen = D.collate(samples, tokenizer, config)
    zeroed = D.collate(samples, tokenizer, config, zero_image=True)
    assert seen["pixel_values_videos"].abs().sum() > 0
    assert zeroed["pixel_values_videos"].shape == seen["pixel_values_videos"].shape
    assert zeroed["pixel_values_videos"].dtype == seen["pixel_values_videos"].dtype
    assert not zeroed["pixel_values_videos"].any()
    for key in seen:
        if key != "pixel_values_videos":
            assert seen[key].equal(zeroed[key]), key
    bound = D.make_collate_fn(tokenizer, config, zero_image=True)
    assert not bound(samples)["pixel_values_videos"].any()


def test_zero_image_recipe_switch_reaches_every_training_batch(tmp_path, monkeypatch):
    """With ``[data] zero_image = true`` the model is trained on zeros: every batch the training
    loop builds (and hands to the model) has all-zero pixels; without it, it does not."""
    from napari_tghmoe.train import trainer as T
    from napari_tghmoe.train.recipe import RecipeError, load_recipe, recipe_from_dict

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "tiny-test.toml")
    assert recipe.data.zero_image is False
    recipe.stage1.steps = 1
    recipe.stage1.gradient_accumulation_steps = 1
    built: list = []
    original = T.make_batch

    def recording(*args, **kwargs):
        batch = original(*args, **kwargs)
        built.append(batch["pixel_values_videos"].clone())
        return batch

    monkeypatch.setattr(T, "make_batch", recording)
    T.train(recipe, 1, tmp_path / "seen", progress=False)
    assert built and all(b.abs().sum() > 0 for b in built)
    built.clear()
    recipe.data.zero_image = True
    T.train(recipe, 1, tmp_path / "zeroed", progress=False)
    assert built and all(not b.any() for b in built)
    with pytest.raises(RecipeError, match="zero_image"):
        recipe_from_dict(
            {"model": {"tiny": {"text_hidden": 64}}, "tokenizer": {"source": "build"}, "data": {"train": ["phantom:seeds=0"], "zero_image": "yes"}},
            "inline",
        )


def test_a_phantom_reaches_the_model_in_the_plane_it_is_stored_in(tokenizer_and_config):
    """The loaders draw the plane from the seed and nothing on the way to the model turns the
    volume back to axial: the model's input is the stored slice order (else the plane question
    could not be answered from the image)."""
    import torch

    from napari_tghmoe.io._geometry import orientation_name
    from napari_tghmoe.model.preprocess import prepare_volume
    from napari_tghmoe.phantom import acquisition, make_phantom

    tokenizer, config = tokenizer_and_config
    seeds = {acquisition(seed)["plane"]: seed for seed in range(40)}
    assert set(seeds) == {"axial", "coronal", "sagittal", "oblique"}
    for plane, seed in seeds.items():
        samples = D.load_phantoms([seed], "chest", shape=(8, 48, 64), tasks=("vqa_closed",))
        volume = D.load_sample_volume(samples[0])
        stored = make_phantom(seed, "chest", shape=(8, 48, 64), plane=plane)
        assert samples[0].meta["plane"] == plane == orientation_name(volume.direction)
        np.testing.assert_array_equal(volume.hu, stored.volume.hu)
        plane_items = [s for s in samples if s.qtype == "plane"]
        assert [s.meta["answer_text"] for s in plane_items] == [plane]
        batch = D.collate(plane_items, tokenizer, config)
        expected = prepare_volume(stored.volume, None, config).pixel_values_videos
        assert torch.equal(batch["pixel_values_videos"], expected)
        if plane != "axial":
            axial = prepare_volume(make_phantom(seed, "chest", shape=(8, 48, 64), plane="axial").volume, None, config)
            assert not torch.allclose(axial.pixel_values_videos, expected)
