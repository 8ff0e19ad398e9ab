"""What the 3D encoder found, as the chat model's evidence tokens (med3d/evidence.py, med3d/sites.py,
and the "evidence" volume encoder of model/volume_tokens.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_tghmoe.io import CTVolume
from napari_tghmoe.med3d.evidence import (
    EVIDENCE_FEATURES,
    SCAN_OFFSET,
    evidence_feature_names,
    EVIDENCE_KINDS,
    EVIDENCE_ORGANS,
    ScanEvidence,
    evidence_tokens,
    evidence_words,
    scan_evidence,
)
from napari_tghmoe.med3d.sites import SiteHead, train_site_head, training_pairs
from napari_tghmoe.med3d.types import SegFinding, SegmentationResult


def _segmented_ct(direction=None):
    """A 20 x 40 x 40 CT at 2 mm: a body, a liver (label 1, 60 HU), an aorta (label 5, 250 HU) and a
    cyst-labelled blob (label 20) in the liver's right half."""
    hu = np.full((20, 40, 40), -1000.0, dtype=np.float32)
    hu[:, 5:35, 5:35] = 30.0
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[5:15, 10:30, 8:20] = 1
    hu[labels == 1] = 60.0
    labels[:, 18:22, 20:24] = 5
    hu[labels == 5] = 250.0
    labels[8:11, 12:15, 10:13] = 20
    volume = CTVolume(hu, spacing=(2.0, 2.0, 2.0), direction=direction if direction is not None else np.eye(3)[:, ::-1])
    finding = SegFinding(
        kind="hypodense liver lesion", label=20, voxel_zyx=(9, 13, 11), position_mm=(22.0, 26.0, 18.0),
        volume_ml=0.2, probability=0.8, location="liver", voxel_count=27, peak_probability=0.95,
        verifier_probability=0.9,
    )
    result = SegmentationResult(
        labels=labels, label_names={0: "background", 1: "liver", 5: "aorta", 20: "hypodense liver lesion"},
        findings=[finding], structure_volumes_ml={}, finding_presence={}, model_name="test", seconds=0.0,
    )
    return volume, result


def test_scan_evidence_measures_organs_and_places_the_finding_in_body_organ_and_aorta_frames():
    volume, result = _segmented_ct()
    evidence = scan_evidence(volume, result)
    assert evidence.organ_hu == {"liver": 60.0, "aorta": 250.0}
    assert evidence.organ_ml["aorta"] == pytest.approx(20 * 4 * 4 * 8 / 1000.0)
    (finding,) = evidence.findings
    assert finding.organ == "liver" and finding.voxel_zyx == (9, 13, 11)
    # liver box z 5..15, y 10..30, x 8..20 voxels: the centre (9, 13, 11) sits low in y and x
    assert finding.organ_fraction == pytest.approx(((9 - 5) / 10, (13 - 10) / 20, (11 - 8) / 12))
    # the aorta's centre at that level: (y, x) = (19.5, 21.5) voxels -> (13 - 19.5, 11 - 21.5) * 2 mm
    assert finding.from_aorta_mm[1:] == pytest.approx(((13 - 19.5) * 2, (11 - 21.5) * 2))
    assert evidence.slice_normal == pytest.approx((0.0, 0.0, 1.0))  # stored axial
    assert ScanEvidence.from_json(json.loads(json.dumps(evidence.to_json()))) == evidence


def test_a_coronal_series_gives_the_evidence_of_its_axial_twin():
    volume, result = _segmented_ct()
    axial = scan_evidence(volume, result)
    # store the same scan coronally: array axes (y, z, x); direction columns follow the axes
    coronal_direction = volume.direction[:, [1, 0, 2]]
    coronal = CTVolume(np.ascontiguousarray(volume.hu.transpose(1, 0, 2)), spacing=(2.0, 2.0, 2.0), direction=coronal_direction)
    moved = SegmentationResult(
        labels=np.ascontiguousarray(result.labels.transpose(1, 0, 2)), label_names=result.label_names,
        findings=[SegFinding(**{**result.findings[0].__dict__, "voxel_zyx": (13, 9, 11)})],
        structure_volumes_ml={}, finding_presence={}, model_name="test", seconds=0.0,
    )
    twin = scan_evidence(coronal, moved)
    assert twin.organ_hu == axial.organ_hu
    assert twin.findings[0].organ_fraction == pytest.approx(axial.findings[0].organ_fraction)
    assert twin.findings[0].body_fraction == pytest.approx(axial.findings[0].body_fraction)
    assert twin.slice_normal != axial.slice_normal  # the stored plane is what differs


def test_evidence_tokens_put_the_scan_first_and_the_surest_findings_in_the_slots():
    volume, result = _segmented_ct()
    evidence = scan_evidence(volume, result)
    unsure = ScanEvidence.from_json(evidence.to_json()).findings[0]
    unsure.kind, unsure.verifier_probability = "renal cyst", 0.3
    evidence.findings.insert(0, unsure)
    tokens = evidence_tokens(evidence, max_findings=3)
    assert tokens.shape == (4, EVIDENCE_FEATURES) and tokens.dtype == np.float32
    assert tokens[0, SCAN_OFFSET] == 1.0 and tokens[1:3, 1].tolist() == [1.0, 1.0]  # token types
    assert not tokens[0, :SCAN_OFFSET].any() and not tokens[1:, SCAN_OFFSET:].any()  # disjoint layouts
    kinds = [EVIDENCE_KINDS[int(np.argmax(row[2 : 2 + len(EVIDENCE_KINDS)]))] for row in tokens[1:3]]
    assert kinds == ["hypodense liver lesion", "renal cyst"]  # surest first
    assert not tokens[3].any()  # an empty slot says nothing
    assert evidence_tokens(ScanEvidence([], {}, {}, (0.0, 0.0, 1.0)), 2)[1:].sum() == 0


def _pair(kind: str, side: float, site: str):
    volume, result = _segmented_ct()
    finding = scan_evidence(volume, result).findings[0]
    finding.kind = kind
    finding.body_fraction = (0.5, 0.5, side)
    return finding, site


def test_the_site_head_learns_sides_keeps_each_kind_to_its_sites_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(40):
        side = float(rng.uniform(0.05, 0.95))
        pairs.append(_pair("pleural effusion", side, "left pleural space" if side > 0.5 else "right pleural space"))
        pairs.append(_pair("lung nodule", side, "left lower lobe" if side > 0.5 else "right lower lobe"))
    head, accuracy = train_site_head(pairs, steps=400)
    assert accuracy > 0.9
    left = _pair("pleural effusion", 0.9, "")[0]
    assert head.site(left)[0] == "left pleural space"
    probabilities = head.probabilities(left)
    lobes = [head.names.index(n) for n in ("left lower lobe", "right lower lobe")]
    assert probabilities[lobes].sum() == 0.0  # an effusion is never placed in a lobe
    assert head.site(_pair("renal cyst", 0.9, "")[0]) == (None, 0.0)  # a kind never seen: no site
    head.save(tmp_path)
    again = SiteHead.load(tmp_path)
    assert np.allclose(again.probabilities(left), probabilities)
    assert SiteHead.load(tmp_path / "none") is None
    # the finding token carries the site probabilities
    evidence = ScanEvidence([left], {}, {}, (0.0, 0.0, 1.0))
    assert evidence_tokens(evidence, 1, head)[1].sum() > evidence_tokens(evidence, 1)[1].sum()


def test_training_pairs_match_truth_to_the_nearest_finding_of_its_kind():
    volume, result = _segmented_ct()
    record = scan_evidence(volume, result).to_json()
    record["truth"] = {
        "spacing": [2.0, 2.0, 2.0],
        "findings": [
            {"kind": "hypodense liver lesion", "location": "left lobe of the liver", "center_voxel": [10, 14, 11]},
            {"kind": "renal cyst", "location": "left kidney, upper pole", "center_voxel": [9, 13, 11]},  # no such finding
            {"kind": "hypodense liver lesion", "location": "far away", "center_voxel": [9, 39, 39]},  # too far
        ],
    }
    pairs = training_pairs([record])
    assert [(f.kind, site) for f, site in pairs] == [("hypodense liver lesion", "left lobe of the liver")]


# ---------------------------------------------------------------------------- the chat model's evidence encoder
@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    from napari_tghmoe.med3d.encoder import build_tiny_seg_model
    from napari_tghmoe.med3d.segment import attach_finding_model

    root = tmp_path_factory.mktemp("cascade")
    organs = build_tiny_seg_model(root / "organs")
    finder = build_tiny_seg_model(root / "finder", organ_names=[], working_spacing=[4.0, 4.0, 4.0])
    return attach_finding_model(organs, finder, root / "bundle")


def test_an_evidence_encoder_feeds_one_scan_token_and_the_finding_slots(cascade, tmp_path, monkeypatch):
    from napari_tghmoe.model import volume_tokens
    from napari_tghmoe.model.modeling import adapt_2d_mllm
    from napari_tghmoe.model.tiny import build_tiny_base_model
    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS, build_tokenizer
    from napari_tghmoe.phantom import make_phantom

    model = adapt_2d_mllm(build_tiny_base_model(seed=0, vocab_size=512), {"volume_grid": [8, 64, 64], "moe_blocks": [2, 3]})
    tokenizer = build_tokenizer(DEFAULT_CORPUS, vocab_size=512)
    model.config.volume_evidence_findings = 3
    volume_tokens.attach_volume_encoder(model, cascade, tokenizer, source="evidence")
    assert model.config.num_volume_tokens == 4 and model.config.volume_feature_size == EVIDENCE_FEATURES
    assert isinstance(model.volume_encoder, volume_tokens.EvidenceReader)

    volume = make_phantom(5, "abdomen", spacing=(8.0, 8.0, 8.0)).volume
    volume.source = str(tmp_path / "scan-5.npz")
    monkeypatch.setenv("TGHMOE_EVIDENCE_CACHE", str(tmp_path / "evidence"))
    from napari_tghmoe.med3d import segment

    calls = []
    real = segment.segment_volume
    monkeypatch.setattr(segment, "segment_volume", lambda *a, **k: calls.append(1) or real(*a, **k))
    features = model.volume_features(volume)
    assert features.shape == (4, EVIDENCE_FEATURES) and features[0, SCAN_OFFSET] == 1.0
    assert (tmp_path / "evidence" / "scan-5.json").is_file()
    assert torch.equal(model.volume_features(volume), features) and len(calls) == 1  # kept in memory
    fresh = volume_tokens.EvidenceReader(cascade, 3)
    assert torch.equal(fresh.features(volume), features) and len(calls) == 1  # read from the disk cache

    # the verbal path starts at the names' word embeddings: a kind's feature reads as its words
    names = evidence_feature_names()
    kind_index = next(i for i, n in names.items() if n == "renal cyst")
    ids = tokenizer("renal cyst", add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[torch.tensor(ids)].mean(0)
    assert torch.allclose(model.volume_projector.verbal[kind_index], expected)
    one_hot = torch.zeros(1, 1, EVIDENCE_FEATURES)
    one_hot[0, 0, kind_index] = 1.0
    text = torch.zeros(1, model.config.text_config.hidden_size)
    tokens, _ = model.volume_projector(one_hot, text)  # fresh experts add zeros
    assert torch.allclose(tokens[0, 0], expected, atol=1e-6)

    # saved and loaded: the same config, the cascade copied beside the model
    model.save_pretrained(tmp_path / "model")
    from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration

    loaded = TGHMoEForConditionalGeneration.from_pretrained(str(tmp_path / "model"))
    assert loaded.config.volume_token_source == "evidence" and loaded.config.num_volume_tokens == 4
    assert isinstance(loaded.volume_encoder, volume_tokens.EvidenceReader)
    assert (tmp_path / "model" / loaded.config.volume_encoder / "findings" / "config.json").is_file()
    assert loaded.volume_encoder.words_min_certainty == 0.5  # the default cut of the words


def test_the_words_cut_is_the_models_own_and_a_recipe_may_set_it(cascade, tmp_path):
    from napari_tghmoe.med3d.evidence import ScanEvidence
    from napari_tghmoe.model import volume_tokens
    from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration, adapt_2d_mllm
    from napari_tghmoe.model.tiny import build_tiny_base_model
    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS, build_tokenizer
    from napari_tghmoe.train.recipe import recipe_from_dict
    from napari_tghmoe.train.trainer import build_model

    volume, result = _segmented_ct()
    evidence = scan_evidence(volume, result)
    unsure = ScanEvidence.from_json(evidence.to_json()).findings[0]
    unsure.kind, unsure.verifier_probability = "renal cyst", 0.7  # certainty 0.7: between the cuts
    evidence.findings.append(unsure)

    model = adapt_2d_mllm(build_tiny_base_model(seed=0, vocab_size=512), {"volume_grid": [8, 64, 64], "moe_blocks": [2, 3]})
    tokenizer = build_tokenizer(DEFAULT_CORPUS, vocab_size=512)
    model.config.volume_words_min_certainty = 0.8
    volume_tokens.attach_volume_encoder(model, cascade, tokenizer, source="evidence")
    reader = model.volume_encoder
    reader._scan = lambda *a, **k: evidence  # the evidence above, for any scan
    assert "renal cyst" not in reader.words(volume)  # under 0.8: in the tokens only
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded = TGHMoEForConditionalGeneration.from_pretrained(str(tmp_path / "model"))
    assert loaded.config.volume_words_min_certainty == 0.8 and loaded.volume_encoder.words_min_certainty == 0.8

    recipe = recipe_from_dict({"model": {"tiny": {"text_hidden": 64}, "evidence_words_min_certainty": 0.6, "evidence_words_copy_bias": 3.0},
                               "tokenizer": {"source": "build"}, "data": {"train": ["phantom:seeds=0"]}}, "test recipe")
    continued = build_model(recipe, init=tmp_path / "model", tokenizer=tokenizer)
    assert continued.config.volume_words_min_certainty == 0.6 and continued.config.volume_words_copy_bias == 3.0
    continued.volume_encoder._scan = lambda *a, **k: evidence
    assert "renal cyst" in continued.volume_encoder.words(volume)
    with pytest.raises(ValueError, match="volume_words_min_certainty"):
        type(loaded.config)(volume_words_min_certainty=1.5)
    from napari_tghmoe.train.recipe import RecipeError

    with pytest.raises(RecipeError, match="evidence_words_copy_bias"):
        recipe_from_dict({"model": {"tiny": {"text_hidden": 64}, "evidence_words_copy_bias": -1.0},
                          "tokenizer": {"source": "build"}, "data": {"train": ["phantom:seeds=0"]}}, "test recipe")


def test_an_organ_model_alone_is_no_evidence_encoder(tmp_path):
    from napari_tghmoe.med3d.encoder import build_tiny_seg_model
    from napari_tghmoe.model.volume_tokens import VolumeEncoderError, load_volume_encoder

    organs = build_tiny_seg_model(tmp_path / "organs")
    with pytest.raises(VolumeEncoderError, match="cascade"):
        load_volume_encoder(organs, "evidence")


def test_the_organ_and_kind_vocabularies_are_the_bundled_models():
    config = json.loads((__import__("pathlib").Path(__file__).resolve().parents[1] / "resources/demo-seg-model/config.json").read_text())
    assert tuple(config["organ_names"]) == EVIDENCE_ORGANS and tuple(config["finding_kinds"]) == EVIDENCE_KINDS


def test_the_evidence_in_words_names_plane_phase_and_the_sure_findings_at_their_sites():
    from napari_tghmoe.med3d.evidence import evidence_words, finding_size_mm, stored_plane
    from napari_tghmoe.med3d.sites import train_phase_head

    volume, result = _segmented_ct()
    evidence = scan_evidence(volume, result)
    unsure = ScanEvidence.from_json(evidence.to_json()).findings[0]
    unsure.kind, unsure.verifier_probability = "renal cyst", 0.2
    evidence.findings.append(unsure)
    assert stored_plane(evidence) == "axial"
    assert finding_size_mm(evidence.findings[0]) == 7  # 0.2 mL: a 7 mm sphere
    # a phase head learnt from the aorta's attenuation
    records = []
    for phase, aorta in (("arterial", 300.0), ("non-contrast", 40.0)) * 6:
        record = evidence.to_json()
        record["organ_hu"] = {**record["organ_hu"], "aorta": aorta}
        record["truth"] = {"phase": phase}
        records.append(record)
    phase_head, accuracy = train_phase_head(records, steps=300)
    assert accuracy == 1.0
    words = evidence_words(evidence, phase_head=phase_head)
    assert words == "3D encoder: axial series, arterial phase. Found: 7 mm hypodense liver lesion in the liver."
    nothing = evidence_words(ScanEvidence([], {}, {}, (0.0, 0.6, 0.8)))
    assert nothing == "3D encoder: oblique series. Found: nothing."


def test_the_evidence_words_follow_the_volume_tokens_in_the_prompt_and_guide_no_router(cascade):
    from napari_tghmoe.model.modeling import adapt_2d_mllm
    from napari_tghmoe.model.prompts import PromptBuilder
    from napari_tghmoe.model.tiny import build_tiny_base_model
    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS, build_tokenizer
    from napari_tghmoe.model import volume_tokens

    model = adapt_2d_mllm(build_tiny_base_model(seed=0, vocab_size=512), {"volume_grid": [8, 64, 64], "moe_blocks": [2, 3]})
    tokenizer = build_tokenizer(DEFAULT_CORPUS, vocab_size=512)
    volume_tokens.attach_volume_encoder(model, cascade, tokenizer, source="evidence")
    builder = PromptBuilder(tokenizer, model.config)
    words = "3D encoder: axial series. Found: nothing."
    plain = builder.build_inputs("Which plane?", 4)
    told = builder.build_inputs("Which plane?", 4, evidence_words=words)
    word_ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    ids = told.input_ids[0].tolist()
    end = ids.index(int(model.config.volume_token_id)) + model.config.num_volume_tokens + 1  # the volume block's end
    assert ids[end : end + len(word_ids)] == word_ids
    assert told.input_ids.shape[1] == plain.input_ids.shape[1] + len(word_ids)
    assert told.text_guidance_mask.sum() == plain.text_guidance_mask.sum()  # the instruction alone guides


def test_a_model_built_to_take_another_models_weights_keeps_its_vocabulary(cascade):
    """Ablation arms built anew from a recipe with the evidence encoder (dense LoRA, text-blind)
    copy a trained model's tensors: the embedding table must keep that model's size (no row is
    added for the volume placeholder), or the embeddings and the LM head are not copied."""
    from pathlib import Path

    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS, build_tokenizer
    from napari_tghmoe.train.cli import load_recipe_with_overrides
    from napari_tghmoe.train.trainer import build_model

    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny-test.toml"
    recipe = load_recipe_with_overrides(
        str(tiny), [f'model.volume_encoder="{cascade}"', 'model.volume_token_source="evidence"']
    )
    tokenizer = build_tokenizer(DEFAULT_CORPUS, vocab_size=512)
    size = len(tokenizer)
    copied = build_model(recipe, tokenizer=tokenizer, weights_from="trained-model-folder")
    assert copied.get_input_embeddings().weight.shape[0] == size == len(tokenizer)
    fresh = build_model(recipe, tokenizer=build_tokenizer(DEFAULT_CORPUS, vocab_size=512))
    assert fresh.get_input_embeddings().weight.shape[0] == size + 1  # a new model gets its placeholder row


# ------------------------------------------------------------------ simulated evidence (training)


@pytest.fixture(scope="module")
def chest_phantom():
    from napari_tghmoe.phantom import make_phantom

    for seed in range(40):  # the first chest phantom with two findings or more
        phantom = make_phantom(seed, "chest", shape=(32, 64, 96), plane="axial")
        if len(phantom.findings) >= 2:
            return phantom
    raise AssertionError("no chest phantom with two findings in seeds 0-39")


def test_a_noiseless_simulated_cascade_finds_every_lesion_inside_it(chest_phantom):
    from napari_tghmoe.med3d.oracle_evidence import NO_NOISE, truth_segmentation

    result = truth_segmentation(chest_phantom, NO_NOISE)
    assert sorted(f.kind for f in result.findings) == sorted(f.kind for f in chest_phantom.findings)
    for finding in result.findings:
        index = [t.kind for t in chest_phantom.findings].index(finding.kind)
        assert chest_phantom.lesions[finding.voxel_zyx] == index + 1  # its centre lies in its own lesion
        assert finding.verifier_probability >= 0.55
    evidence = scan_evidence(chest_phantom.volume, result)
    assert {f.kind for f in evidence.findings} == {f.kind for f in chest_phantom.findings}
    assert set(evidence.organ_hu) >= {"aorta", "right upper lobe", "left lower lobe"}
    assert evidence_words(evidence).startswith("3D encoder: axial series.")


def test_the_simulated_cascade_misses_and_invents_findings_as_told(chest_phantom):
    from napari_tghmoe.med3d.oracle_evidence import CascadeNoise, truth_segmentation
    from napari_tghmoe.med3d.types import DEFAULT_ORGANS

    blind = truth_segmentation(chest_phantom, CascadeNoise(miss=1.0, unsure=0.0, false_per_scan=0.0))
    assert blind.findings == []
    unsure = truth_segmentation(chest_phantom, CascadeNoise(miss=0.0, unsure=1.0, false_per_scan=0.0))
    assert len(unsure.findings) == len(chest_phantom.findings)
    assert all(f.verifier_probability < 0.5 for f in unsure.findings)  # in the tokens, not the words
    assert "Found: nothing." in evidence_words(scan_evidence(chest_phantom.volume, unsure))
    invented = truth_segmentation(
        chest_phantom, CascadeNoise(miss=1.0, unsure=0.0, false_per_scan=6.0), np.random.default_rng(3)
    )
    assert invented.findings, "six false findings per scan on average: some must be drawn"
    chest_kinds = {"lung nodule", "pleural effusion", "enlarged lymph node"}
    for finding in invented.findings:
        assert finding.kind in chest_kinds
        assert finding.location in DEFAULT_ORGANS  # drawn inside an organ the scan shows
