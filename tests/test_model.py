"""TGH-MoE modeling: adaptation, text-guided routing, losses, stages, traces, save/load, generate.

Everything runs on the tiny Qwen2.5-VL of ``napari_tghmoe.model.tiny`` (random weights, CPU).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_tghmoe.model.configuration import TGHMoEConfig
from napari_tghmoe.model.modeling import (
    TGHMoEForConditionalGeneration,
    adapt_2d_mllm,
    set_stage,
)
from napari_tghmoe.model.routing import RoutingTrace
from napari_tghmoe.model.tiny import TINY_SPECIAL_TOKENS as TOK
from napari_tghmoe.model.tiny import build_tiny_base_model, tiny_base_config

PATCH, TEMPORAL, MERGE = 8, 2, 2


# ---------------------------------------------------------------------------- helpers
def volume_to_patch_rows(volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, H, W) volume -> pixel_values_videos rows + video_grid_thw, in the layout documented in
    routing.py (the same permutation as transformers' Qwen2VLVideoProcessor; the 3 channels repeat
    the volume)."""
    depth, height, width = volume.shape
    gt, gh, gw = depth // TEMPORAL, height // PATCH, width // PATCH
    video = volume[:, None].expand(depth, 3, height, width)
    rows = video.reshape(gt, TEMPORAL, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    rows = rows.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(
        gt * gh * gw, 3 * TEMPORAL * PATCH * PATCH
    )
    return rows.contiguous().float(), torch.tensor([[gt, gh, gw]])


def prompt_ids(question: list[int], n_video_tokens: int) -> list[int]:
    return (
        [TOK["bos"], *question[:2], TOK["vision_start"]]
        + [TOK["video"]] * n_video_tokens
        + [TOK["vision_end"], *question[2:]]
    )


def instruction_mask(ids: torch.Tensor) -> torch.Tensor:
    """The text-guidance mask a trainer passes: the instruction's own tokens (no special or
    vision tokens)."""
    special = torch.tensor([TOK["bos"], TOK["pad"], TOK["vision_start"], TOK["vision_end"], TOK["video"]])
    return ~torch.isin(ids, special)


def left_pad(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, sequences))
    ids = torch.full((len(sequences), length), TOK["pad"])
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq) :] = torch.tensor(seq)
        mask[row, length - len(seq) :] = 1
    return ids, mask


def video_inputs(grid=(4, 8, 8), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    volume = torch.rand((grid[0] * TEMPORAL, grid[1] * PATCH, grid[2] * PATCH), generator=generator)
    return volume_to_patch_rows(volume)


def n_tokens(grid_thw: torch.Tensor) -> int:
    return int(grid_thw.prod()) // MERGE**2


def randomise_adapters(model: TGHMoEForConditionalGeneration, seed: int = 1) -> None:
    """Give the zero-initialised LoRA B matrices values, so the experts change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def adapted(**moe) -> TGHMoEForConditionalGeneration:
    return adapt_2d_mllm(build_tiny_base_model(seed=0), moe or None).eval()


# ---------------------------------------------------------------------------- config
def test_config_defaults_round_grid_and_keep_shared_group_first():
    config = TGHMoEConfig.from_base_config(tiny_base_config(patch_size=14))
    assert config.volume_grid == [32, 252, 252]  # h, w rounded to patch (14) x merge (2)
    assert config.group_names[0] == "shared"
    shallow, deep = config.moe_blocks[0], config.moe_blocks[-1]
    assert config.groups_for_block(shallow) == ["shared"]
    assert config.groups_for_block(deep) == config.group_names
    assert config.expert_names()[:2] == ["shared.0", "shared.1"]
    with pytest.raises(ValueError, match="shared"):
        TGHMoEConfig.from_base_config(tiny_base_config(), group_names=["report", "shared"])
    with pytest.raises(ValueError, match="outside"):
        TGHMoEConfig.from_base_config(tiny_base_config(), moe_blocks=[7])


# ---------------------------------------------------------------------------- adaptation
def test_adapt_keeps_every_base_tensor_bit_identical():
    base = build_tiny_base_model(seed=0)
    before = {key: value.clone() for key, value in base.state_dict().items()}
    model = adapt_2d_mllm(base)
    after = model.state_dict()
    assert isinstance(model, TGHMoEForConditionalGeneration)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    new_keys = set(after) - set(before)
    assert new_keys and all(".moe." in k or ".lora_" in k for k in new_keys)


def test_adapted_model_starts_equal_to_the_base():
    reference = build_tiny_base_model(seed=0)
    model = adapted()
    pixels, grid = video_inputs()
    ids = torch.tensor([prompt_ids([10, 11, 12, 13], n_tokens(grid))])
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid).logits
        got = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid).logits
    assert torch.equal(got, expected)
    randomise_adapters(model)
    with torch.no_grad():
        changed = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid).logits
    assert not torch.allclose(changed, expected)


def test_forward_backward_and_losses_combine_with_the_config_coefficients():
    model = adapted(router_aux_loss_coef=0.5, router_z_loss_coef=0.25, task_loss_coef=2.0)
    model.train()
    pixels, grid = video_inputs()
    ids = torch.tensor([prompt_ids([10, 11, 12, 13], n_tokens(grid))])
    report = model.config.group_names.index("report")
    out = model(
        input_ids=ids,
        pixel_values_videos=pixels,
        video_grid_thw=grid,
        labels=ids,
        task_labels=torch.tensor([report]),
        text_guidance_mask=instruction_mask(ids),
    )
    parts = (out.lm_loss, out.load_balancing_loss, out.z_loss, out.task_loss)
    assert all(p is not None and torch.isfinite(p) for p in parts)
    expected = out.lm_loss + 0.5 * out.load_balancing_loss + 0.25 * out.z_loss + 2.0 * out.task_loss
    assert torch.allclose(out.loss, expected)
    assert out.load_balancing_loss > 0
    out.loss.backward()
    deep = model.config.moe_blocks[-1]
    layer = model.model.visual.blocks[deep].moe
    assert layer.groups["shared"].lora_B.grad.abs().sum() > 0  # LM loss reaches the experts
    assert layer.task_router.weight.grad.abs().sum() > 0  # task loss reaches the level-1 router
    assert (
        layer.groups["report"].router.weight.grad.abs().sum() > 0
    )  # balancing reaches token routers
    # task_labels alone (no LM labels) still give a loss; "shared" is no task and is ignored
    out = model(
        input_ids=ids,
        pixel_values_videos=pixels,
        video_grid_thw=grid,
        task_labels=torch.tensor([0]),
        text_guidance_mask=instruction_mask(ids),
    )
    assert out.lm_loss is None and out.task_loss is None and torch.isfinite(out.loss)


def test_task_supervision_pulls_the_level1_router_towards_the_label():
    model = adapted()
    model.train()
    set_stage(model, 2)
    pixels, grid = video_inputs()
    ids = torch.tensor([prompt_ids([10, 11, 12, 13], n_tokens(grid))])
    target = model.config.group_names.index("vqa_open")
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    first = None
    for _ in range(3):
        out = model(
            input_ids=ids,
            pixel_values_videos=pixels,
            video_grid_thw=grid,
            task_labels=torch.tensor([target]),
            text_guidance_mask=instruction_mask(ids),
        )
        first = out.group_probs[0, target].item() if first is None else first
        optimiser.zero_grad()
        out.task_loss.backward()
        optimiser.step()
    assert out.group_probs[0, target].item() > first + 0.05


@pytest.mark.parametrize(("top_k", "experts"), [(1, 2), (2, 2), (2, 3)])
def test_the_answer_loss_reaches_every_router(top_k, experts):
    """With the routing losses off, the LM loss alone must move every token, text and task router:
    a renormalised top-1 gate is 1.0 whatever the router says, so without a detached
    denominator the routers would learn nothing from the answer."""
    model = adapted(
        router_top_k=top_k,
        experts_per_group=experts,
        router_aux_loss_coef=0.0,
        router_z_loss_coef=0.0,
        task_loss_coef=0.0,
    )
    randomise_adapters(model)  # experts that change the output, as after training
    model.train()
    pixels, grid = video_inputs()
    ids = torch.tensor([prompt_ids([10, 11, 12, 13], n_tokens(grid))])
    out = model(
        input_ids=ids,
        pixel_values_videos=pixels,
        video_grid_thw=grid,
        labels=ids,
        text_guidance_mask=instruction_mask(ids),
    )
    out.lm_loss.backward()
    routers = {
        name: param
        for name, param in model.named_parameters()
        if ".moe." in name and ("router" in name) and name.endswith("weight")
    }
    assert routers
    # rounding alone leaves ~1e-10 on a router the loss does not reach; a real gradient is ~1e-2
    silent = [
        name
        for name, param in routers.items()
        if param.grad is None or not param.grad.abs().max() > 1e-6
    ]
    assert silent == []


def test_training_without_a_text_guidance_mask_is_an_error():
    """The fallback text vector pools every text token; in a training sequence that includes the
    answer, which would leak into the routing."""
    model = adapted()
    pixels, grid = video_inputs()
    ids = torch.tensor([prompt_ids([10, 11, 12, 13], n_tokens(grid))])
    inputs = {"input_ids": ids, "pixel_values_videos": pixels, "video_grid_thw": grid}
    with pytest.raises(ValueError, match="text_guidance_mask"):
        model(**inputs, labels=ids)  # an auxiliary loss, even in eval mode
    model.train()
    with pytest.raises(ValueError, match="text_guidance_mask"):
        model(**inputs)
    with pytest.raises(ValueError, match="text_guidance_mask"):
        model.text_features(ids)
    model.eval()
    with torch.no_grad():
        assert model(**inputs).logits is not None  # generating from a prompt: the fallback is fine


# ---------------------------------------------------------------------------- text guidance
def routing_trace(model, ids, pixels, grid, attention_mask=None, **kwargs) -> RoutingTrace:
    with torch.no_grad(), model.record_routing() as recorder:
        model(
            input_ids=ids,
            attention_mask=attention_mask,
            pixel_values_videos=pixels,
            video_grid_thw=grid,
            **kwargs,
        )
    assert recorder.trace is not None
    return recorder.trace


def test_two_prompts_give_different_group_probabilities():
    model = adapted()
    pixels, grid = video_inputs()
    report = routing_trace(
        model, torch.tensor([prompt_ids([40, 41, 42, 43], n_tokens(grid))]), pixels, grid
    )
    question = routing_trace(
        model, torch.tensor([prompt_ids([90, 91, 92, 93], n_tokens(grid))]), pixels, grid
    )
    probs_a, probs_b = report.task_probs(), question.task_probs()
    assert set(probs_a) == {"report", "vqa_closed", "vqa_open"}
    assert math.isclose(sum(probs_a.values()), 1.0, rel_tol=1e-5)
    assert max(abs(probs_a[g] - probs_b[g]) for g in probs_a) > 1e-3
    # the same prompt routes the same way: the difference comes from the text, not from noise
    again = routing_trace(
        model, torch.tensor([prompt_ids([40, 41, 42, 43], n_tokens(grid))]), pixels, grid
    )
    assert again.task_probs() == pytest.approx(probs_a)


def test_text_vector_ignores_vision_tokens_and_padding_and_follows_the_guidance_mask():
    model = adapted()
    question = [40, 41, 42, 43]
    plain = model.text_features(torch.tensor([[TOK["bos"], *question]]))
    with_vision = model.text_features(torch.tensor([prompt_ids(question, 16)]))
    ids, mask = left_pad([[TOK["bos"], *question], [TOK["bos"], 7, 8, 9, 10, 11, 12, 13]])
    padded = model.text_features(ids, attention_mask=mask)
    assert torch.allclose(plain[0], with_vision[0], atol=1e-6)
    assert torch.allclose(plain[0], padded[0], atol=1e-6)
    only_last = torch.zeros_like(ids, dtype=torch.bool)
    only_last[:, -1] = True
    guided = model.text_features(ids, attention_mask=mask, text_guidance_mask=only_last)
    single = model.text_features(torch.tensor([[question[-1]]]))
    assert torch.allclose(guided[0], single[0], atol=1e-6)


def test_the_vision_tower_alone_gives_the_tokens_the_llm_reads_under_the_same_prompt():
    model = adapted()
    randomise_adapters(model)
    pixels, grid = video_inputs()
    ids = torch.tensor([prompt_ids([40, 41, 42, 43], n_tokens(grid))])
    seen = []
    hook = model.model.visual.register_forward_hook(lambda m, a, out: seen.append(out.pooler_output))
    with torch.no_grad():
        model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid)
        alone, routing = model.encode_visual(pixels, grid, model.text_features(ids), ids)
        other_prompt = torch.tensor([prompt_ids([90, 91, 92, 93], n_tokens(grid))])
        other, _ = model.encode_visual(pixels, grid, model.text_features(other_prompt), other_prompt)
    hook.remove()
    tokens = torch.cat(list(alone.pooler_output))  # one tensor per video
    assert tokens.shape == (n_tokens(grid), model.config.text_config.hidden_size)
    torch.testing.assert_close(tokens, seen[0])
    assert list(routing.visual_sample) == [0]
    assert not torch.allclose(torch.cat(list(other.pooler_output)), tokens, atol=1e-5)  # text-guided


def test_batch_of_two_prompts_routes_each_sample_by_its_own_prompt():
    model = adapted()
    randomise_adapters(model)
    grid_shape = (
        2,
        12,
        16,
    )  # several attention windows per frame: the tower really permutes tokens
    pixels_a, grid = video_inputs(grid_shape, seed=1)
    pixels_b, _ = video_inputs(grid_shape, seed=2)
    n = n_tokens(grid)
    seq_a = prompt_ids([40, 41, 42, 43], n)
    seq_b = prompt_ids([90, 91, 92, 93, 94, 95, 96], n)
    ids, mask = left_pad([seq_a, seq_b])
    batch = routing_trace(
        model, ids, torch.cat([pixels_a, pixels_b]), torch.cat([grid, grid]), attention_mask=mask
    )
    alone_a = routing_trace(model, torch.tensor([seq_a]), pixels_a, grid)
    alone_b = routing_trace(model, torch.tensor([seq_b]), pixels_b, grid)
    assert list(batch.visual_sample) == [0, 1]
    for block in batch.blocks:
        np.testing.assert_allclose(
            batch.group_probs[block][0], alone_a.group_probs[block][0], atol=1e-5
        )
        np.testing.assert_allclose(
            batch.group_probs[block][1], alone_b.group_probs[block][0], atol=1e-5
        )
        np.testing.assert_allclose(
            batch.weights_for(block, 0), alone_a.weights_for(block, 0), atol=1e-5
        )
        np.testing.assert_allclose(
            batch.weights_for(block, 1), alone_b.weights_for(block, 0), atol=1e-5
        )
    # sample b's volume under sample a's prompt routes differently: the per-token text really
    # matters
    swapped = routing_trace(model, torch.tensor([seq_a]), pixels_b, grid)
    deep = batch.blocks[-1]
    assert not np.allclose(swapped.weights_for(deep, 0), batch.weights_for(deep, 1), atol=1e-4)


# ---------------------------------------------------------------------------- traces
def test_patch_layout_helper_matches_the_qwen_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = torch.rand(32, 48)
    rows, grid = volume_to_patch_rows(frame[None].expand(TEMPORAL, 32, 48))
    reference, grid_h, grid_w = Qwen2VLImageProcessorPil().patchify(
        frame[None].expand(3, 32, 48).numpy(), PATCH, MERGE, TEMPORAL
    )
    assert grid.tolist() == [[1, grid_h, grid_w]]
    np.testing.assert_array_equal(rows.numpy(), reference)


def test_trace_maps_a_known_region_to_its_voxels():
    """Block 0 sees the patch embedding directly (its attention output is zeroed); its router sends
    bright patches to shared.0 and dark ones to shared.1. A bright box in one corner, off the
    merge-group and window grid, must come back at exactly its voxels in ``expert_map``."""
    model = adapted(
        moe_blocks=[0],
        block_groups={"0": ["shared"]},
        experts_per_group={"shared": 2, "report": 1, "vqa_closed": 1, "vqa_open": 1},
        router_top_k=1,
    )
    block = model.model.visual.blocks[0]
    shared = block.moe.groups["shared"]
    with torch.no_grad():
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.zero_()
        bright_direction = model.model.visual.patch_embed.proj.weight.sum(dim=(1, 2, 3, 4))
        bright_direction = bright_direction / bright_direction.norm()
        shared.router.weight.copy_(torch.stack([bright_direction, -bright_direction]) * 20)
        shared.text_router.weight.zero_()

    depth, height, width = 4, 96, 128  # patch grid (2, 12, 16); 2x2 windows of 4x4 merge groups
    box = (slice(2, 4), slice(8, 40), slice(72, 120))  # temporal patch 1, patch rows 1-4, cols 9-14
    volume = -torch.ones(depth, height, width)
    volume[box] = 1.0
    pixels, grid = volume_to_patch_rows(volume)
    ids = torch.tensor([prompt_ids([40, 41, 42, 43], n_tokens(grid))])
    trace = routing_trace(model, ids, pixels, grid)

    assert trace.weights_for(0).shape == (2, 12, 16, len(trace.expert_names))
    target_shape = (8, 48, 64)  # the "CT": twice the slices, half the in-plane resolution
    dominant = trace.expert_map(0, target_shape)
    assert dominant.shape == target_shape
    mask = np.zeros((depth, height, width), dtype=bool)
    mask[box] = True
    centres = [
        np.floor((np.arange(m) + 0.5) * n / m).astype(int) for n, m in zip(mask.shape, target_shape)
    ]
    expected_mask = mask[np.ix_(*centres)]
    shared_0, shared_1 = trace.expert_names.index("shared.0"), trace.expert_names.index("shared.1")
    np.testing.assert_array_equal(dominant, np.where(expected_mask, shared_0, shared_1))

    weight = trace.expert_map(0, target_shape, expert=shared_0)
    assert weight.dtype == np.float32 and weight.shape == target_shape
    assert weight[7, 10, 45] > 0.99 and weight[1, 10, 45] < 0.01 and weight[7, 40, 10] < 0.01
    per_slice = trace.dominant_per_slice(0, n_slices=8)
    assert (
        list(per_slice) == [shared_1] * 4 + [shared_1] * 4
    )  # the box covers a minority of each slice
    utilisation = trace.utilisation(0)
    assert utilisation[shared_0] == pytest.approx(mask.mean(), abs=1e-6)
    summary = trace.summary()
    assert summary["blocks"] == [0] and len(summary["utilisation"]["0"]) == len(trace.expert_names)


def test_routing_is_recorded_only_inside_the_context():
    model = adapted()
    pixels, grid = video_inputs()
    ids = torch.tensor([prompt_ids([40, 41, 42, 43], n_tokens(grid))])
    with model.record_routing() as recorder, torch.no_grad():
        model(input_ids=ids)  # text only: no vision forward, no trace
        assert recorder.trace is None
        model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid)
    with torch.no_grad():
        model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid)
    assert len(recorder.traces) == 1
    assert model._routing_recorder is None


# ---------------------------------------------------------------------------- stages
def expected_stage_parameters(model: TGHMoEForConditionalGeneration, stage: int) -> set[str]:
    names = set()
    for block_index, layer in model.moe_layers().items():
        prefix = f"model.visual.blocks.{block_index}.moe"
        for group in layer.group_names:
            params = ["lora_A", "lora_B", "router.weight", "text_router.weight"]
            if stage == 1 and group == "shared":
                names |= {f"{prefix}.groups.shared.{p}" for p in params}
            if stage == 2 and group != "shared":
                names |= {f"{prefix}.groups.{group}.{p}" for p in params}
        if stage == 2 and layer.task_router is not None:
            names |= {f"{prefix}.task_router.weight", f"{prefix}.task_router.bias"}
    if stage == 1:
        names |= {n for n, _ in model.named_parameters() if n.startswith("model.visual.merger.lora_")}
        for i in range(model.config.text_config.num_hidden_layers):
            for target in model.config.llm_lora_targets:
                for p in ("lora_A", "lora_B"):
                    names.add(f"model.language_model.layers.{i}.self_attn.lora_{target}.{p}")
    return names


@pytest.mark.parametrize("stage", [1, 2])
def test_set_stage_trains_exactly_the_intended_parameters(stage):
    model = adapted()
    counts = set_stage(model, stage)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_stage_parameters(model, stage)
    params = dict(model.named_parameters())
    assert counts["trainable"] == sum(params[n].numel() for n in trainable)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    parts = ("shared_experts", "merger", "llm_lora") if stage == 1 else ("task_experts", "routers")
    assert all(counts[p] > 0 for p in parts)
    assert sum(counts[p] for p in parts) == counts["trainable"]


def stage1_trained(model: TGHMoEForConditionalGeneration) -> None:
    """What stage 1 leaves: trained shared experts and LoRA, task experts still at B = 0."""
    randomise_adapters(model)
    with torch.no_grad():
        for layer in model.moe_layers().values():
            for name in layer.task_group_names:
                layer.groups[name].lora_B.zero_()


def test_stage2_starts_the_task_experts_from_the_shared_subspace_once(tmp_path):
    model = adapted()
    stage1_trained(model)
    deep = model.moe_layers()[model.config.moe_blocks[-1]]
    shared = deep.groups["shared"]
    assert set_stage(model, 1)["task_experts_copied"] == 0
    assert set_stage(model, 2)["task_experts_copied"] == 1
    for name in deep.task_group_names:
        group = deep.groups[name]
        for j in range(group.num_experts):
            assert torch.equal(group.lora_A[j], shared.lora_A[j % shared.num_experts])
        assert not group.lora_B.any()
    with torch.no_grad():
        deep.groups["report"].lora_B.add_(1.0)  # stage 2 trains the task experts ...
        shared.lora_A.add_(1.0)  # ... and a reloaded or re-staged model must not redo the start
    trained_A = deep.groups["report"].lora_A.detach().clone()
    assert set_stage(model, 2)["task_experts_copied"] == 0
    assert torch.equal(deep.groups["report"].lora_A, trained_A)
    assert deep.groups["report"].lora_B.all()
    model.save_pretrained(tmp_path)  # the flag is saved with the model
    reloaded = TGHMoEForConditionalGeneration.from_pretrained(tmp_path)
    assert set_stage(reloaded, 2)["task_experts_copied"] == 0
    assert torch.equal(reloaded.moe_layers()[deep.block_index].groups["report"].lora_A, trained_A)


def test_stage2_starts_from_exactly_the_stage1_function():
    model = adapted()
    stage1_trained(model)
    pixels, grid = video_inputs()
    ids = torch.tensor([prompt_ids([10, 11, 12, 13], n_tokens(grid))])
    inputs = {"input_ids": ids, "pixel_values_videos": pixels, "video_grid_thw": grid}
    with torch.no_grad():
        before = model(**inputs).logits
        set_stage(model, 2)
        after = model(**inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_training_both_stages_leaves_every_base_tensor_bit_identical():
    """The merger trains through its LoRA, never itself: the base stays the base."""
    model = adapted()
    base_keys = {n for n, _ in model.named_parameters() if ".moe." not in n and ".lora_" not in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in base_keys}
    pixels, grid = video_inputs()
    ids = torch.tensor([prompt_ids([10, 11, 12, 13], n_tokens(grid))])
    model.train()
    for stage in (1, 2):
        set_stage(model, stage)
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            out = model(
                input_ids=ids,
                pixel_values_videos=pixels,
                video_grid_thw=grid,
                labels=ids,
                task_labels=torch.tensor([1]),
                text_guidance_mask=instruction_mask(ids),
            )
            optimiser.zero_grad()
            out.loss.backward()
            optimiser.step()
    merger_lora = model.model.visual.merger.lora_mlp_0.lora_B
    assert merger_lora.abs().sum() > 0  # stage 1 did train the merger's adapter
    for name, value in before.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name


# ---------------------------------------------------------------------------- save / load
def test_save_pretrained_from_pretrained_gives_identical_logits(tmp_path):
    model = adapted(router_top_k=1, experts_per_group=3)
    randomise_adapters(model)
    pixels, grid = video_inputs()
    ids = torch.tensor([prompt_ids([10, 11, 12, 13], n_tokens(grid))])
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid).logits
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not [
        f for f in files if f.endswith((".bin", ".pt", ".pth"))
    ]
    reloaded = TGHMoEForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.router_top_k == 1 and reloaded.config.experts_per_group["report"] == 3
    with torch.no_grad():
        got = reloaded(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid).logits
    assert torch.equal(got, expected)


def test_a_plain_qwen_folder_loads_with_fresh_experts_that_change_nothing(tmp_path):
    base = build_tiny_base_model(seed=0)
    base.save_pretrained(tmp_path)
    model = TGHMoEForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixels, grid = video_inputs()
    ids = torch.tensor([prompt_ids([10, 11, 12, 13], n_tokens(grid))])
    with torch.no_grad():
        expected = base(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid).logits
        got = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid).logits
    assert torch.equal(got, expected)
    shared = model.moe_layers()[model.config.moe_blocks[-1]].groups["shared"]
    assert (
        shared.lora_A.abs().sum() > 0 and shared.lora_B.abs().sum() == 0
    )  # LoRA init, not garbage


def test_llm_lora_survives_replacing_the_base_linear():
    """bitsandbytes swaps nn.Linear for Linear4bit after __init__: the LoRA must follow the swap."""
    model = adapted()
    randomise_adapters(model)
    ids = torch.tensor([[TOK["bos"], 10, 11, 12]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    attention = model.model.language_model.layers[0].self_attn
    old = attention.q_proj
    replacement = torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    replacement.load_state_dict(old.state_dict())
    attention.q_proj = replacement
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------- generate
def test_generate_uses_text_guidance_and_records_a_trace():
    reference = build_tiny_base_model(seed=0)
    model = adapted()
    pixels, grid = video_inputs()
    ids = torch.tensor([prompt_ids([40, 41, 42, 43], n_tokens(grid))])
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=TOK["pad"])
    with torch.no_grad():
        expected_tokens = reference.generate(
            input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, **settings
        )
    with model.record_routing() as recorder, torch.no_grad():
        tokens = model.generate(
            input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, **settings
        )
    assert torch.equal(tokens, expected_tokens)  # experts start at zero: same answer as the base
    assert len(recorder.traces) == 1  # vision runs once, in the prefill step
    from_forward = routing_trace(model, ids, pixels, grid)
    assert recorder.trace.task_probs() == pytest.approx(from_forward.task_probs(), abs=1e-6)
    # another question routes differently inside generate() too
    other = torch.tensor([prompt_ids([90, 91, 92, 93], n_tokens(grid))])
    with model.record_routing() as other_recorder, torch.no_grad():
        model.generate(input_ids=other, pixel_values_videos=pixels, video_grid_thw=grid, **settings)
    first, second = recorder.trace.task_probs(), other_recorder.trace.task_probs()
    assert max(abs(first[g] - second[g]) for g in first) > 1e-3


def test_task_probabilities_average_the_blocks_with_task_groups_a_missing_group_counting_zero():
    """The one rule behind the forward's group_probs and the engine's untraced task probabilities:
    shared is always 1; a block without task groups does not count; a task group a block does
    not carry counts 0 in that block's share of the mean."""
    import torch

    from napari_tghmoe.model.moe import mean_task_group_probs

    names = ["shared", "report", "vqa_closed", "vqa_open"]
    blocks = [
        (None, []),  # shallow block: shared group only
        (torch.tensor([[0.5, 0.25, 0.25]]), ["report", "vqa_closed", "vqa_open"]),
        (torch.tensor([[0.9, 0.1]]), ["report", "vqa_closed"]),
    ]
    mean = mean_task_group_probs(blocks, names)
    assert mean.tolist() == [[1.0, pytest.approx(0.7), pytest.approx(0.175), pytest.approx(0.125)]]
    assert mean_task_group_probs([(None, [])], names) is None

