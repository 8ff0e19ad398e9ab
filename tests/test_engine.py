"""InferenceEngine: streaming answers, stopping within one token, prompts, and a complete Answer."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

from napari_tghmoe.engine import Answer, InferenceEngine
from napari_tghmoe.io import CTVolume
from napari_tghmoe.model.prompts import (
    REPORT_PROMPTS,
    closed_choices,
    format_closed_question,
    is_closed_question,
    is_report_request,
    plan_prompt,
)

LONG = {"min_new_tokens": 400}  # the random model may otherwise say <|im_end|> at once


@pytest.fixture(scope="module")
def engine(tuned_tghmoe_folder):
    return InferenceEngine.from_pretrained(tuned_tghmoe_folder, device="cpu")


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    return CTVolume(rng.normal(0, 300, (12, 70, 60)).astype(np.float32), spacing=(2.5, 0.8, 0.8))


def generation_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tghmoe-generate" and t.is_alive()]


# ------------------------------------------------------------------ streaming and stopping


def test_streams_text_chunks_then_the_answer_last(engine, volume):
    items = list(engine.answer(volume, "Is the liver normal?", max_new_tokens=12, generation_options={"min_new_tokens": 12}))
    chunks, answer = items[:-1], items[-1]
    assert isinstance(answer, Answer)
    assert len(chunks) >= 2 and all(isinstance(c, str) and c for c in chunks)
    assert "".join(chunks).strip() == answer.text
    assert answer.timings["n_tokens"] == 12


def test_stop_event_stops_within_one_token_and_text_arrived_before_the_end(engine, volume):
    stop = threading.Event()
    seen = []
    for item in engine.answer(volume, "Where is the nodule?", max_new_tokens=400, stop_event=stop, generation_options=LONG):
        if isinstance(item, str):
            seen.append(item)
            stop.set()  # from the consumer side, as the chat's Stop button does
        else:
            answer = item
    assert seen and answer.stopped
    assert answer.tokens_after_stop <= 1  # counted by the streamer after the event was set
    assert answer.timings["n_tokens"] < 400  # the first chunk came long before the end
    assert not generation_threads()


def test_stop_event_set_before_the_start_generates_at_most_one_token(engine, volume):
    stop = threading.Event()
    stop.set()
    answer = engine.ask(volume, "Describe the liver.", max_new_tokens=50, stop_event=stop, generation_options=LONG)
    assert answer.stopped and answer.timings["n_tokens"] <= 1


def test_closing_the_generator_stops_the_generation_and_frees_the_engine(engine, volume):
    stream = engine.answer(volume, "Is there a fracture?", max_new_tokens=400, generation_options=LONG)
    assert isinstance(next(stream), str)
    stream.close()
    assert not generation_threads()
    answer = engine.ask(volume, "Is there a fracture?", max_new_tokens=3)  # the lock was released
    assert answer.timings["n_tokens"] <= 3


def test_concurrent_callers_are_served_one_at_a_time(engine, volume):
    results: dict[str, Answer] = {}

    def ask(question: str) -> None:
        results[question] = engine.ask(volume, question, max_new_tokens=6, generation_options={"min_new_tokens": 6})

    threads = [threading.Thread(target=ask, args=(q,)) for q in ("Is the liver normal?", "Generate a report")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(results) == {"Is the liver normal?", "Generate a report"}
    alone = engine.ask(volume, "Is the liver normal?", max_new_tokens=6, generation_options={"min_new_tokens": 6})
    assert results["Is the liver normal?"].text == alone.text  # greedy and undisturbed by the other call


# ------------------------------------------------------------------ the Answer


def test_answer_fields_are_populated(engine, volume):
    answer = engine.ask(volume, "Is the liver normal?", max_new_tokens=8, generation_options={"min_new_tokens": 8})

    assert answer.text
    assert answer.question == "Is the liver normal?" and answer.prompt_kind == "question"
    assert answer.prompt == "Is the liver normal?"
    assert set(answer.task_probs) == {"report", "vqa_closed", "vqa_open"}
    assert sum(answer.task_probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert answer.routing is not None and answer.routing.blocks == engine.model.config.moe_blocks
    assert answer.routing.task_probs() == answer.task_probs
    assert answer.routing.expert_map(answer.routing.blocks[-1], volume.shape).shape == volume.shape
    timings = answer.timings
    assert timings["n_tokens"] == 8
    for key in ("preprocess_s", "time_to_first_token_s", "generate_s", "tokens_per_s"):
        assert timings[key] > 0, key
    assert timings["time_to_first_token_s"] <= timings["generate_s"]
    assert answer.device == "cpu" and answer.peak_memory > 10 * 2**20
    assert answer.model_name == "tiny-tghmoe"
    assert answer.weights_sha256 == engine.info.weights_sha256 and len(answer.weights_sha256) == 64
    assert answer.precision == "float32"
    assert not answer.stopped


def test_without_trace_the_task_probabilities_come_from_the_routers_alone(engine, volume):
    traced = engine.ask(volume, "Which organ is abnormal?", max_new_tokens=2)
    untraced = engine.ask(volume, "Which organ is abnormal?", max_new_tokens=2, trace=False)
    assert untraced.routing is None
    assert untraced.task_probs == pytest.approx(traced.task_probs, abs=1e-5)


def test_task_probabilities_follow_the_question(engine, volume):
    report = engine.ask(volume, "Write the report", max_new_tokens=1, trace=False)
    closed = engine.ask(volume, "Which organ? Choices: A. liver B. lung C. kidney D. spleen", max_new_tokens=1, trace=False)
    assert report.task_probs != pytest.approx(closed.task_probs, abs=1e-4)


def test_report_requests_use_the_m3d_style_template(engine, volume):
    answer = engine.ask(volume, "Please generate a radiology report for this scan.", max_new_tokens=2)
    assert answer.prompt_kind == "report" and answer.prompt == REPORT_PROMPTS[0]
    assert answer.question == "Please generate a radiology report for this scan."


def test_empty_question_is_refused_before_any_work(engine, volume):
    with pytest.raises(ValueError, match="empty"):
        next(engine.answer(volume, "   "))


def test_accepts_an_array_with_spacing_and_prepared_inputs(engine, volume):
    from napari_tghmoe.model.preprocess import prepare_volume

    from_array = engine.ask(volume.hu, "Is the liver normal?", spacing=volume.spacing, max_new_tokens=3)
    prepared = prepare_volume(volume, None, engine.model.config)
    from_inputs = engine.ask(prepared, "Is the liver normal?", max_new_tokens=3)
    assert from_array.text == from_inputs.text


# ------------------------------------------------------------------ intensity kinds


def test_a_unit_volume_to_an_hu_model_warns_and_the_answer_keeps_the_warning(engine, volume):
    """M3D-style [0, 1] volumes given to a model trained on HU: converted, with a project warning
    (which napari's worker in the chat dock relays as a notification) and a note in the Answer."""
    from napari_tghmoe.model.preprocess import IntensityMismatchWarning

    assert engine.model.config.input_intensity == "hu"
    unit = CTVolume((volume.hu - volume.hu.min()) / np.ptp(volume.hu), spacing=volume.spacing, metadata={"intensity": "unit"})
    with pytest.warns(IntensityMismatchWarning, match=r"\[0, 1\] display intensities.*trained on CT in Hounsfield units"):
        answer = engine.ask(unit, "Is the liver normal?", max_new_tokens=2)
    assert any("display intensities" in note for note in answer.warnings)
    # a float file whose values all lie in [0, 1] (no kind given) is taken as unit, and the warning says why
    with pytest.warns(IntensityMismatchWarning, match=r"values lie in \[0, 1\]"):
        engine.ask(CTVolume(unit.hu, spacing=volume.spacing), "Is the liver normal?", max_new_tokens=1)


def test_matching_kinds_do_not_warn_and_a_unit_model_warns_on_hu(engine, volume):
    import warnings

    from napari_tghmoe.model.preprocess import IntensityMismatchWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", IntensityMismatchWarning)
        answer = engine.ask(volume, "Is the liver normal?", max_new_tokens=1)
    assert not any("intensities" in note for note in answer.warnings)
    model = copy.deepcopy(engine.model)
    model.config.input_intensity = "unit"
    unit_engine = InferenceEngine(model, engine.tokenizer, engine.info)
    with pytest.warns(IntensityMismatchWarning, match="windowed .* min-max normalised the M3D way"):
        unit_engine.ask(CTVolume(volume.hu, spacing=volume.spacing, metadata={"intensity": "hu"}), "Is it normal?", max_new_tokens=1)


# ------------------------------------------------------------------ prompt construction


def test_prompt_holds_the_video_tokens_and_guidance_covers_only_the_question(engine):
    question = "Is there a nodule in the left lung?"
    inputs = engine.build_inputs(question, num_video_tokens=64)
    ids = inputs.input_ids[0].tolist()
    video = engine.model.config.video_token_id

    assert ids.count(video) == 64
    start = ids.index(engine.model.config.vision_start_token_id)
    assert ids[start + 1 : start + 65] == [video] * 64
    assert ids[start + 65] == engine.model.config.vision_end_token_id
    assert (inputs.mm_token_type_ids[0] == 2).tolist() == [i == video for i in ids]
    guided = [i for i, keep in zip(ids, inputs.text_guidance_mask[0].tolist()) if keep]
    assert engine.tokenizer.decode(guided) == question
    assert inputs.prompt_text.startswith("<|im_start|>user\n<|vision_start|>")
    assert inputs.prompt_text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_minimal_template_when_the_tokenizer_has_none(engine):
    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.chat_template = None
    bare = InferenceEngine(engine.model, tokenizer, engine.info)
    assert bare.render_prompt("Q?") == (
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "prompt, target, task",
    [
        ("Write the report.", "The lungs are clear.", "report"),
        (format_closed_question("Which organ is abnormal?", ["lung", "liver", "kidney", "spleen"]), "B. liver", "vqa_closed"),
    ],
)
def test_training_sees_the_very_prompt_tokens_the_engine_sends(engine, volume, monkeypatch, prompt, target, task):
    """One prompt builder: the ids and instruction mask training collates for a sample are the
    ones the engine hands to ``generate`` for the same volume and prompt."""
    from napari_tghmoe.train.data import Sample, collate

    sent = {}
    generate = engine.model.generate

    def recording_generate(**kwargs):
        sent.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(engine.model, "generate", recording_generate)
    engine.ask(volume, prompt, max_new_tokens=1, trace=False)
    sample = Sample(volume, prompt, target, task)
    batch = collate([sample], engine.tokenizer, engine.model.config)
    prompt_length = int((batch["labels"][0] == -100).sum())  # no padding in a batch of one

    assert batch["input_ids"][0, :prompt_length].tolist() == sent["input_ids"][0].tolist()
    assert batch["text_guidance_mask"][0, :prompt_length].tolist() == sent["text_guidance_mask"][0].tolist()
    assert batch["mm_token_type_ids"][0, :prompt_length].tolist() == sent["mm_token_type_ids"][0].tolist()


def test_the_prompt_builder_uses_the_tokenizers_own_chat_template(engine):
    from napari_tghmoe.model.prompts import PromptBuilder

    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.chat_template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}<<reply>>"
    builder = PromptBuilder(tokenizer, engine.model.config)
    assert builder.render("Q?") == "<<user>><|vision_start|><|video_pad|><|vision_end|>Q?<<reply>>"
    assert InferenceEngine(engine.model, tokenizer, engine.info).render_prompt("Q?") == builder.render("Q?")


@pytest.mark.parametrize(
    "request_text",
    ["Generate a report", "write the report.", "Describe the findings", "What are the findings?",
     "Can you write me a report of this CT?", "Please generate a radiology report for this scan", "findings",
     "Generate a radiology report for this CT scan.", "Describe the findings in this chest CT scan.",
     "What are the findings in these images?", "Report the findings of this CT."],
)
def test_report_requests_are_recognised(request_text):
    assert is_report_request(request_text)
    assert plan_prompt(request_text).kind == "report"


@pytest.mark.parametrize(
    "request_text",
    ["Interpret this CT scan.", "Please read this study.", "Could you do a write-up of this exam?",
     "Dictate a report for this CT.", "Summarize the findings in this volume.", "Describe this CT volume.",
     "What does this scan show?", "List the abnormalities seen in this CT scan.", "Give me your interpretation.",
     "I'd like the impression for this exam, please.", "Go through the images and tell me the findings."],
)
def test_requests_for_the_whole_read_in_other_words_are_report_requests(request_text):
    """Radiologists ask for a read in many words; each is the engine's report template."""
    assert plan_prompt(request_text).kind == "report"


@pytest.mark.parametrize(
    "question",
    ["Report the size of the nodule.", "Review the findings in the liver.", "Are there any findings?",
     "What does the liver look like?", "Which lesions are benign?", "Describe the left kidney.",
     "Quick question about this study: where is the lung nodule located?",
     "The question is about a box on axial: voxels z 3-5. Describe the findings."],
)
def test_a_request_about_something_specific_stays_a_question(question):
    assert not is_report_request(question) and plan_prompt(question).text == question


def test_no_phantom_question_in_any_framing_is_taken_for_a_report_request():
    from napari_tghmoe.datasets.phrasings import QUESTION_HELDOUT, QUESTION_TRAIN
    from napari_tghmoe.datasets.samples import closed_vqa_prompt
    from napari_tghmoe.phantom import make_phantom

    asked = 0
    for seed in range(12):
        phantom = make_phantom(seed=seed, region="chest" if seed % 2 == 0 else "abdomen", shape=(16, 32, 48))
        for item in phantom.vqa:
            for framing in QUESTION_TRAIN + QUESTION_HELDOUT:
                text = framing.format(question=item.question, question_lc=item.question[0].lower() + item.question[1:])
                for typed in (text, closed_vqa_prompt(text, item.choices)):
                    assert not is_report_request(typed), typed
                    asked += 1
    assert asked > 500


@pytest.mark.parametrize(
    "question",
    ["Is there a fracture?", "Is there a report of a fracture?", "Describe the liver", "Is there a nodule in this CT scan?",
     "What is the finding in the left kidney?", "Which organ? Choices: A. liver B. lung"],
)
def test_questions_go_as_typed(question):
    plan = plan_prompt(question)
    assert plan.kind == "question" and plan.text == question


def test_closed_questions_keep_the_m3d_choices_format():
    text = format_closed_question("Which plane is this?", ["axial", "coronal", "sagittal", "oblique"])
    assert text == "Which plane is this? Choices: A. axial B. coronal C. sagittal D. oblique"
    assert is_closed_question(text) and plan_prompt(text).closed and plan_prompt(text).text == text
    assert not is_closed_question("What are my choices for treatment?")
    with pytest.raises(ValueError):
        format_closed_question("Q?", ["only one"])


def test_the_options_of_a_closed_question_are_read_back_in_order():
    options = ["right upper lobe", "left kidney, upper pole", "spleen", "liver"]
    text = format_closed_question("Where is the finding?", options)
    assert closed_choices(text) == list(zip("ABCD", options))
    assert closed_choices("In which plane? Choices: A. axial B. coronal C. sagittal.") == [
        ("A", "axial"), ("B", "coronal"), ("C", "sagittal")
    ]
    assert closed_choices("Is the liver normal?") == []
    assert closed_choices("Pick one. Choices: B. liver C. lung") == []  # letters must start at A


class _Biased:
    """The engine's model with the logits of some tokens raised in plain forward calls (those that
    score options); ``generate`` and everything else are the model's own."""

    def __init__(self, model, token_ids, bias=8.0):
        self._model, self._ids, self._bias = model, token_ids, bias

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, **kwargs):
        output = self._model(**kwargs)
        output.logits[..., self._ids] += self._bias
        return output


CHOICES = ["liver", "lung", "kidney", "spleen"]


def test_a_closed_question_is_answered_with_the_option_the_model_finds_most_likely(engine, volume):
    question = format_closed_question("Which organ is abnormal?", CHOICES)
    favoured = engine.tokenizer.encode(" kidney", add_special_tokens=False)
    ranked = InferenceEngine(_Biased(engine.model, favoured), engine.tokenizer, engine.info)
    answer = ranked.ask(volume, question, max_new_tokens=6, trace=False)
    assert answer.text == "C. kidney"
    assert set(answer.choice_scores) == set("ABCD")
    assert max(answer.choice_scores, key=answer.choice_scores.get) == "C"
    assert all(score <= 0.0 for score in answer.choice_scores.values())  # mean log-probabilities
    free = engine.ask(volume, question, max_new_tokens=6, trace=False)
    assert answer.generated_text == free.generated_text  # the model's own words are kept beside
    from napari_tghmoe.report import ReportDocument

    note = [n for n in ReportDocument.from_answer(answer, volume).notes if n.startswith("Multiple choice")]
    assert len(note) == 1 and f'wrote: "{answer.generated_text}"' in note[0] and "C " in note[0]


def test_without_ranking_or_for_open_questions_the_answer_is_the_generated_text(engine, volume):
    question = format_closed_question("Which organ is abnormal?", CHOICES)
    free = InferenceEngine(engine.model, engine.tokenizer, engine.info, rank_choices=False)
    answer = free.ask(volume, question, max_new_tokens=6, trace=False)
    assert answer.text == answer.generated_text and answer.choice_scores == {}
    opened = engine.ask(volume, "Which organ is abnormal?", max_new_tokens=6, trace=False)
    assert opened.text == opened.generated_text and opened.choice_scores == {}


def test_the_options_scored_from_the_prompt_s_cache_score_as_full_forwards_do(engine, volume):
    """The prompt is read once and each option continues from its key/value cache: the same
    log-probabilities as one full forward per option (the 3D rope offsets of the video included)."""
    import torch

    inputs = engine.prepare(volume)
    question = format_closed_question("Which organ is abnormal?", CHOICES)
    prompt = engine.build_inputs(question, inputs.num_video_tokens)
    kwargs = {
        "input_ids": prompt.input_ids,
        "attention_mask": prompt.attention_mask,
        "mm_token_type_ids": prompt.mm_token_type_ids,
        "text_guidance_mask": prompt.text_guidance_mask,
        **inputs.model_kwargs(device="cpu"),
    }
    options = [engine.tokenizer.encode(f"{l}. {o}", add_special_tokens=False) for l, o in zip("ABCD", CHOICES)]
    with torch.inference_mode():
        cached = engine._option_log_probs(kwargs, options, cached=True)
        full = engine._option_log_probs(kwargs, options, cached=False)
    assert [len(c) for c in cached] == [len(o) for o in options]
    for a, b in zip(cached, full):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    again = engine._option_log_probs(kwargs, options[::-1], cached=True)  # the cache is back to the prompt each time
    for a, b in zip(again, full[::-1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
