"""Two-stage training on a tiny recipe, resuming, stage-2 trainables, and the shipped demo model.

Everything runs on a few 8x64x64 phantoms with a model of ~0.2 M parameters, so the whole
file takes seconds on a CPU. Numbers are never compared with wall-clock time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from napari_tghmoe.cli import main  # noqa: E402
from napari_tghmoe.train.recipe import RecipeError, load_recipe, recipe_from_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-test.toml"
DEMO = ROOT / "resources" / "demo-model"
EVAL_SPEC = "phantom:seeds=900-901,region=both,shape=8x64x64"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Phantom cache + one thread per process (the CPU is shared), for the whole module."""
    cache = tmp_path_factory.mktemp("phantom-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("TGHMOE_CACHE_DIR", str(cache))
    patch.setenv("TGHMOE_TRAIN_THREADS", "1")
    patch.setenv("HF_HUB_OFFLINE", "1")
    yield cache
    patch.undo()


@pytest.fixture(scope="module")
def two_stages(env, tmp_path_factory):
    """`tghmoe train` stage 1, then stage 2 from its output (the CLI, as a user runs it)."""
    out = tmp_path_factory.mktemp("runs")
    stage1, stage2 = out / "stage1", out / "stage2"
    assert main(["train", "--config", str(TINY), "--stage", "1", "--out", str(stage1), "--no-progress"]) == 0
    assert main(
        ["train", "--config", str(TINY), "--stage", "2", "--init", str(stage1), "--out", str(stage2), "--no-progress"]
    ) == 0
    return stage1, stage2


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_stage1_writes_a_loadable_model_log_and_checkpoints(two_stages):
    stage1, _ = two_stages
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training_summary.json"):
        assert (stage1 / name).is_file(), name
    log = _log(stage1)
    assert [e["step"] for e in log] == [1, 2, 4]  # log_every = 2, plus the first step
    for entry in log:
        for key in ("lm", "load_balancing", "z", "task", "total", "lr"):
            assert isinstance(entry[key], float), key
        util = entry["expert_utilisation"]
        assert set(util) == {"2", "3"}
        assert abs(sum(util["2"]) - 1.0) < 1e-3  # block 2 carries only the shared group (gate mass 1)
    state = json.loads((stage1 / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["stage"] == 1 and state["step"] == 4
    assert (stage1 / "checkpoints" / "step-0000004" / "model.safetensors").is_file()


def test_stage2_trains_only_task_experts_and_routers(two_stages):
    from napari_tghmoe.model.modeling import parameter_part

    stage1, stage2 = two_stages
    before, after = load_file(str(stage1 / "model.safetensors")), load_file(str(stage2 / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    parts = {parameter_part(key) for key in changed if not key.endswith("task_experts_initialised")}
    assert parts == {"task_experts", "routers"}
    # every task expert started as a copy of the shared expert and the copy is recorded
    flags = [key for key in after if key.endswith("task_experts_initialised")]
    assert flags and all(bool(after[key]) for key in flags if ".blocks.3." in key)
    summary = json.loads((stage2 / "training_summary.json").read_text())
    assert summary["trainable"]["shared_experts"] == 0 and summary["trainable"]["task_experts"] > 0


def test_eval_runs_end_to_end_on_the_trained_model(two_stages, tmp_path):
    _, stage2 = two_stages
    out = tmp_path / "results.json"
    code = main(
        ["eval", "--model", str(stage2), "--data", EVAL_SPEC, "--task", "all", "--out", str(out),
         "--no-bertscore", "--max-new-tokens", "12", "--limit", "6", "--no-progress", "--device", "cpu"]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert results["n"] == 6
    assert len(results["samples"]) == 6 and all(isinstance(s["prediction"], str) for s in results["samples"])
    assert out.with_suffix(".md").read_text().startswith("# Evaluation")


def test_killed_and_resumed_run_ends_where_an_unbroken_run_ends(env, tmp_path):
    from napari_tghmoe.train.trainer import load_training_samples, train

    recipe = load_recipe(TINY)
    samples = load_training_samples(recipe)
    unbroken = train(recipe, 1, tmp_path / "unbroken", progress=False, samples=samples)
    killed = train(recipe, 1, tmp_path / "resumed", progress=False, samples=samples, stop_after=2)
    assert not killed.finished and not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = train(recipe, 1, tmp_path / "resumed", progress=False, samples=samples, resume=True)
    assert resumed.finished and resumed.steps_done == unbroken.steps_done == 4
    a = load_file(str(tmp_path / "unbroken" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    # the resumed log has each step once, as the unbroken one
    assert [e["step"] for e in _log(tmp_path / "resumed")] == [e["step"] for e in _log(tmp_path / "unbroken")]


def test_recipe_errors_name_the_file_and_the_setting(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[model.tiny]\ntext_hidden = 64\n[data]\ntrain = ["phantom:seeds=0-1"]\n[stage1]\nstepz = 3\n')
    with pytest.raises(RecipeError, match=r"bad\.toml.*stepz"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="train lists no data"):
        recipe_from_dict({"model": {"tiny": {"text_hidden": 64}}, "tokenizer": {"source": "build"}, "data": {"train": []}}, "inline")
    with pytest.raises(RecipeError, match="vision_probe_dense must be balanced or hard"):
        recipe_from_dict(
            {"model": {"tiny": {"text_hidden": 64}}, "tokenizer": {"source": "build"},
             "data": {"train": ["phantom:seeds=0-1"]}, "stage1": {"vision_probe_dense": "focal"}},
            "inline",
        )
    assert main(["train", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")]) == 2
    assert main(["train", "--config", str(TINY), "--stage", "2", "--out", str(tmp_path / "o")]) == 2  # no --init


def test_schedule_warms_up_then_decays_to_the_floor():
    from napari_tghmoe.train.recipe import StageSettings
    from napari_tghmoe.train.trainer import lr_lambda

    factor = lr_lambda(StageSettings(steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine"))
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(100) == pytest.approx(0.1)
    assert factor(30) > factor(60) > factor(90)
    linear = lr_lambda(StageSettings(steps=20, warmup_steps=0, min_lr_ratio=0.0, schedule="linear"))
    assert linear(10) == pytest.approx(0.5)


def test_overrides_reach_the_recipe():
    from napari_tghmoe.train.cli import load_recipe_with_overrides

    recipe = load_recipe_with_overrides(str(TINY), ["stage1.steps=7", "model.moe.text_guidance=false", 'name="x"'])
    assert recipe.stage1.steps == 7 and recipe.model.moe["text_guidance"] is False and recipe.name == "x"


# --------------------------------------------------------------------------- the shipped demo model


def test_demo_model_is_small_safetensors_with_its_card():
    files = {p.name: p.stat().st_size for p in DEMO.iterdir() if p.is_file()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert name in files, name
    assert sum(files.values()) <= 25 * 1024 * 1024
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".pth")) for name in files)
    encoder = json.loads((DEMO / "config.json").read_text()).get("volume_encoder")
    if encoder:  # its 3D encoder ships inside it: weights as safetensors only, and complete
        inside = [p for p in (DEMO / encoder).rglob("*") if p.is_file()]
        assert not any(p.suffix in (".bin", ".pt", ".pkl", ".pth") for p in inside)
        assert (DEMO / encoder / "model.safetensors").is_file() and (DEMO / encoder / "findings" / "model.safetensors").is_file()
    card = (DEMO / "README.md").read_text()
    assert "synthetic" in card.lower() and "not for clinical use" in card.lower()


def test_demo_model_reproduces_the_check_in_its_card(env):
    """Greedy decoding is deterministic: the shipped weights must give exactly the recorded answers
    on the card's fixed held-out subset (so the card's numbers describe these weights)."""
    from napari_tghmoe.engine import InferenceEngine
    from napari_tghmoe.eval.evaluate import evaluate
    from napari_tghmoe.train.data import load_dataset_spec

    check = json.loads((DEMO / "card_check.json").read_text())
    samples = load_dataset_spec(check["data"], task="vqa_closed", limit=check["limit"], seed=check["phrasing_seed"])
    engine = InferenceEngine.from_pretrained(DEMO, device="cpu", quantization="none")
    results = evaluate(engine, samples, task="vqa_closed", max_new_tokens=check["max_new_tokens"], use_bertscore=False)
    assert [r["prediction"] for r in results["samples"]] == check["predictions"]
    assert results["vqa_closed"]["accuracy"] == pytest.approx(check["accuracy"])


def test_ablation_switch_without_text_guidance_zeroes_the_text_vector():
    """Arm (d) of the ablation: ``text_guidance = false`` makes routing ignore the instruction."""
    from napari_tghmoe.model.modeling import adapt_2d_mllm
    from napari_tghmoe.model.tiny import build_tiny_base_model

    ids = torch.tensor([[2, 10, 11, 12, 1]])
    guided = adapt_2d_mllm(build_tiny_base_model(0), {"moe_blocks": [2, 3]})
    unguided = adapt_2d_mllm(build_tiny_base_model(0), {"moe_blocks": [2, 3], "text_guidance": False})
    assert guided.text_features(input_ids=ids).abs().sum() > 0
    assert torch.count_nonzero(unguided.text_features(input_ids=ids)) == 0
    assert unguided.config.to_dict()["text_guidance"] is False  # saved with the model


def test_per_sample_loss_weighs_a_one_token_answer_like_a_long_report():
    from torch.nn.functional import cross_entropy

    from napari_tghmoe.train.trainer import per_sample_lm_loss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=generator)
    labels = torch.full((2, 6), -100)
    labels[0, 5] = 3  # a closed answer: one target token
    labels[1, 1:] = torch.tensor([0, 1, 2, 3, 4])  # a "report": five target tokens
    per_token = cross_entropy(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none")
    per_token = per_token.view(2, 5)
    short, long = per_token[0, 4], per_token[1].mean()
    torch.testing.assert_close(per_sample_lm_loss(logits, labels), (short + long) / 2)
    batch_mean = (per_token[0, 4] + per_token[1].sum()) / 6  # what the stock loss computes
    assert not torch.isclose(per_sample_lm_loss(logits, labels), batch_mean)
    labels[0, 5] = -100  # a sample without targets is left out, not counted as zero
    torch.testing.assert_close(per_sample_lm_loss(logits, labels), long)


def test_one_phase_runs_alone_from_an_init_and_stage2_takes_its_data(env, tmp_path):
    """``--phase N``: a new last phase is trained from a shipped stage-1 function without the phases
    before it, and stage 2 then trains on that phase's data, as ``--stage both`` would."""
    recipe = tmp_path / "phased.toml"
    recipe.write_text(
        TINY.read_text()
        + "\n[[stage1_continue]]\nseed = 5\nstage1 = { steps = 1, lr = 1e-3 }\n"
        + 'data = { train = ["phantom:seeds=4-5,region=both,shape=8x64x64"] }\n'
    )
    base = tmp_path / "base"
    assert main(["train", "--config", str(TINY), "--stage", "1", "--out", str(base), "--no-progress", "--set", "stage1.steps=1"]) == 0
    phase = tmp_path / "phase2"
    assert main(["train", "--config", str(recipe), "--stage", "1", "--phase", "2", "--init", str(base), "--out", str(phase), "--no-progress"]) == 0
    summary = json.loads((phase / "training_summary.json").read_text())
    assert summary["init"] == str(base) and summary["steps"] == 1 and summary["recipe"]["seed"] == 5
    assert summary["recipe"]["data"]["train"] == ["phantom:seeds=4-5,region=both,shape=8x64x64"]
    stage2 = tmp_path / "stage2"
    assert main(["train", "--config", str(recipe), "--stage", "2", "--phase", "2", "--init", str(phase), "--out", str(stage2),
                 "--no-progress", "--set", "stage2.steps=1"]) == 0
    last = json.loads((stage2 / "training_summary.json").read_text())
    assert last["recipe"]["data"]["train"] == ["phantom:seeds=4-5,region=both,shape=8x64x64"] and last["recipe"]["seed"] == 0
    assert main(["train", "--config", str(recipe), "--stage", "1", "--phase", "3", "--init", str(base), "--out", str(tmp_path / "x")]) != 0
    assert main(["train", "--config", str(recipe), "--stage", "both", "--phase", "2", "--out", str(tmp_path / "y")]) != 0


def test_both_stages_run_the_stage1_phases_in_order_then_stage2_from_the_last(env, tmp_path):
    """Each phase continues from the one before; a phase that changes the model (here a finer
    vision patch with a larger merge, the same LLM token count) is rebuilt and takes every
    matching tensor of the previous phase, and later phases and stage 2 keep that model."""
    recipe = tmp_path / "phased.toml"
    recipe.write_text(
        TINY.read_text()
        + "\n[[stage1_continue]]\nseed = 5\nstage1 = { steps = 2, lr = 1e-3 }\n"
        + "\n[[stage1_continue]]\nseed = 6\nmodel = { tiny = { patch_size = 4, spatial_merge_size = 4 } }\n"
        + "stage1 = { steps = 2 }\n"
        + "\n[[stage1_continue]]\nseed = 7\nstage1 = { steps = 1 }\n"
        + 'data = { train = ["phantom:seeds=4-5,region=both,shape=8x64x64"] }\n'
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--stage", "both", "--out", str(out), "--no-progress"]) == 0
    first, second, third, fourth, last = (
        json.loads((out / name / "training_summary.json").read_text())
        for name in ("stage1", "stage1-2", "stage1-3", "stage1-4", "stage2")
    )
    assert first["init"] is None and first["steps"] == 4
    assert second["init"] == str(out / "stage1") and second["steps"] == 2 and second["recipe"]["seed"] == 5
    assert second["recipe"]["stage1"]["also_train"] == first["recipe"]["stage1"]["also_train"]  # merged, not replaced
    # The model-changing phase: built anew, the previous phase's matching tensors copied in.
    assert third["init"] is None and third["init_weights"]["folder"] == str(out / "stage1-2")
    assert "model.visual.patch_embed.proj.weight" in third["init_weights"]["kept"]
    assert all(name.startswith(("model.visual.patch_embed.", "model.visual.merger.")) for name in third["init_weights"]["kept"])
    assert third["init_weights"]["copied"] > 0
    assert fourth["init"] == str(out / "stage1-3") and fourth["recipe"]["model"]["tiny"]["patch_size"] == 4
    assert last["init"] == str(out / "stage1-4") and last["recipe"]["seed"] == 0
    # stage 2 specialises on the data stage 1 ended on
    assert last["recipe"]["data"]["train"] == fourth["recipe"]["data"]["train"] == ["phantom:seeds=4-5,region=both,shape=8x64x64"]
    assert first["recipe"]["data"]["train"] == ["phantom:seeds=0-3,region=both,shape=8x64x64"]
    a = load_file(str(out / "stage1" / "model.safetensors"))
    b = load_file(str(out / "stage1-2" / "model.safetensors"))
    assert any(not torch.equal(a[key], b[key]) for key in a)
    fine = json.loads((out / "stage2" / "config.json").read_text())["vision_config"]
    assert (fine["patch_size"], fine["spatial_merge_size"]) == (4, 4)
    c = load_file(str(out / "stage1-3" / "model.safetensors"))
    patch_embed = next(tensor for name, tensor in c.items() if name.endswith("patch_embed.proj.weight"))
    assert patch_embed.shape[-1] == 4


def test_a_stage1_phase_may_not_change_the_tokenizer():
    with pytest.raises(RecipeError, match="stage1_continue"):
        recipe_from_dict(
            {
                "model": {"tiny": {"text_hidden": 64}},
                "tokenizer": {"source": "build"},
                "data": {"train": ["phantom:seeds=0-1"]},
                "stage1_continue": [{"tokenizer": {"vocab_size": 300}}],
            },
            "inline",
        )


def test_a_phase_that_sets_only_the_words_cut_continues_from_the_previous_model_whole():
    from napari_tghmoe.train.recipe import phase_changes_model, stage1_phases

    recipe = recipe_from_dict(
        {
            "model": {"tiny": {"text_hidden": 64}},
            "tokenizer": {"source": "build"},
            "data": {"train": ["phantom:seeds=0-1"]},
            "stage1_continue": [
                {"model": {"evidence_words_min_certainty": 0.6}, "data": {"faithful_reports": True}},
                {"model": {"volume_token_source": "evidence"}, "data": {"faithful_answers": True}},
            ],
        },
        "inline",
    )
    assert [phase_changes_model(recipe, i) for i in (1, 2, 3)] == [False, False, True]
    phases = stage1_phases(recipe)
    assert phases[1].model.evidence_words_min_certainty == 0.6 and phases[1].data.faithful_reports
    assert phases[2].model.evidence_words_min_certainty == 0.6  # a model setting carries over
    assert phases[0].model.evidence_words_min_certainty is None and not phases[0].data.faithful_reports
    assert phases[2].data.faithful_answers and not phases[1].data.faithful_answers
    with pytest.raises(RecipeError, match="faithful_answers"):
        recipe_from_dict({"model": {"tiny": {"text_hidden": 64}}, "tokenizer": {"source": "build"}, "data": {"train": ["phantom:seeds=0-1"], "faithful_answers": "yes"}}, "inline")


def test_an_ablation_arm_starts_from_the_trained_base_with_its_own_adapters(env, two_stages, tmp_path):
    """--init-weights: the dense-LoRA arm takes every base tensor of a TGH-MoE run and keeps its
    own (differently shaped) adapters as built."""
    from napari_tghmoe.train.cli import load_recipe_with_overrides
    from napari_tghmoe.train.trainer import train

    stage1, _ = two_stages
    recipe = load_recipe_with_overrides(
        str(TINY),
        ['model.moe.group_names=["shared"]', "model.moe.experts_per_group=1", "model.moe.lora_rank=10", "stage1.steps=1", "stage1.lr=0.0"],
    )
    train(recipe, 1, tmp_path / "dense", progress=False, init_weights=stage1)
    summary = json.loads((tmp_path / "dense" / "training_summary.json").read_text())["init_weights"]
    assert summary["folder"] == str(stage1) and summary["copied"] > 0
    assert summary["kept"] and all(".moe." in name for name in summary["kept"])
    source = load_file(str(stage1 / "model.safetensors"))
    dense = load_file(str(tmp_path / "dense" / "model.safetensors"))
    patch_key = next(k for k in source if "patch_embed" in k)
    assert torch.equal(source[patch_key], dense[patch_key])  # the trained base went across (lr 0)


def test_the_card_says_plainly_which_targets_are_met():
    from napari_tghmoe.train.card import target_verdict

    assert target_verdict(0.9, 0.75, 0.85) == "All three targets are met."
    verdict = target_verdict(0.5, 0.75, 0.6)
    assert "closed-VQA accuracy 0.500 is 0.35 below 0.85" in verdict and "precision 0.600" in verdict
    assert "recall" not in verdict
    # every question type is held to 0.7 as well
    typed = target_verdict(0.9, 0.75, 0.85, {"location": 0.672, "plane": 1.0})
    assert typed == "**Targets missed**: closed-VQA location 0.672 is 0.03 below 0.7."
    assert target_verdict(0.9, 0.75, 0.85, {"location": 0.75}) == "All targets are met."


def test_stage2_of_a_topic_routed_arm_starts_from_a_stage1_output_with_init_weights(env, two_stages, tmp_path):
    """The content-routing ablation: stage 2 with other task groups, on the stage-1 base."""
    stage1, _ = two_stages
    topics = '["shared", "report", "chest", "abdomen", "acquisition", "general"]'
    code = main(
        ["train", "--config", str(TINY), "--stage", "2", "--init-weights", str(stage1), "--out", str(tmp_path / "e"),
         "--no-progress", "--set", f"model.moe.group_names={topics}", "--set", "stage2.steps=2"]
    )
    assert code == 0
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["group_names"][2:] == ["chest", "abdomen", "acquisition", "general"]
    source = load_file(str(stage1 / "model.safetensors"))
    arm = load_file(str(tmp_path / "e" / "model.safetensors"))
    patch_key = next(k for k in source if "patch_embed" in k)
    assert torch.equal(source[patch_key], arm[patch_key])  # stage 2 keeps the stage-1 base
    assert any(".groups.chest." in k for k in arm)


def test_a_refreshed_card_keeps_what_the_model_is_and_takes_the_new_numbers():
    """``card --refresh`` (a shipped model whose cascade changed) rewrites only the numbers."""
    import copy

    from napari_tghmoe.train.card import EVALUATION_HEADING, rewrite_evaluation

    card = (DEMO / "README.md").read_text()
    results = json.loads((DEMO / "eval_results.json").read_text())
    check = json.loads((DEMO / "card_check.json").read_text())
    assert rewrite_evaluation(card, results, check) == card  # the shipped card is what write_card wrote

    changed = copy.deepcopy(results)
    changed["vqa_closed"]["accuracy"] = 0.9
    changed["report"]["findings"]["recall"] = 0.5
    new = rewrite_evaluation(card, changed, dict(check, accuracy=0.75), note="The verifier was retrained.")
    assert new.startswith(card[: card.index(EVALUATION_HEADING)])
    assert "Closed-VQA accuracy: **0.900**" in new and "recall: **0.500**" in new
    assert "The verifier was retrained." in new and "accuracy 0.750 on that subset" in new
    assert "Stored with the numbers." in rewrite_evaluation(card, dict(changed, card_note="Stored with the numbers."), check)
    assert "closed-VQA accuracy" not in new.split("**Targets missed**")[1].split(".\n")[0]  # 0.9 meets its target
