"""The evidence copy bias: a phrase the answer has begun to copy from the evidence words ends as
the words end it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from napari_tghmoe.model.copying import EvidenceCopyBias, continuations  # noqa: E402

WORDS = "3D encoder: axial series. Found: 22 mm renal cyst in the left kidney, upper pole; 15 mm renal cyst in the right kidney, lower pole."


def test_the_longest_matching_suffix_decides_what_follows():
    source = [1, 2, 3, 4, 5, 2, 3, 9]
    assert continuations(source, [7, 2, 3]) == {4, 9}  # "2 3" occurs twice
    assert continuations(source, [1, 2, 3]) == {4}  # "1 2 3" occurs once: the longer match wins
    assert continuations(source, [7, 3]) == set()  # "7 3" is not in the source
    assert continuations(source, [3]) == set()  # one token is too little to call it copying
    assert continuations(source, [5, 2, 3, 9]) == set()  # the source's end: nothing follows


def test_the_bias_goes_on_the_continuation_of_each_row_only():
    bias = EvidenceCopyBias([1, 2, 3, 4], 5.0, prompt_length=1)
    scores = torch.zeros(2, 8)
    out = bias(torch.tensor([[0, 1, 2], [0, 6, 7]]), scores)
    assert out[0].tolist() == [0, 0, 0, 5.0, 0, 0, 0, 0] and out[1].eq(0).all()
    assert EvidenceCopyBias([1, 2, 3, 4], 0.0, 1)(torch.tensor([[0, 1, 2]]), torch.zeros(1, 8)).eq(0).all()


def test_the_engine_steers_generation_to_the_evidence_site_only_when_the_model_asks(tiny_tghmoe_folder):
    from transformers import LogitsProcessorList

    from napari_tghmoe.engine import InferenceEngine

    engine = InferenceEngine.from_pretrained(tiny_tghmoe_folder)
    tokenizer = engine.tokenizer
    assert engine.model.config.volume_words_copy_bias == 0.0 and engine._copy_bias(WORDS, 5) is None
    engine.model.config.volume_words_copy_bias = 1e4
    assert engine._copy_bias("", 5) is None  # no evidence, nothing to copy

    started = tokenizer("There is a 22 mm renal cyst in the left kidney,", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([started])
    processor = engine._copy_bias(WORDS, len(started) - 3)  # the last three tokens count as copied
    out = engine.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
        logits_processor=LogitsProcessorList([processor]), pad_token_id=tokenizer.pad_token_id,
    )
    assert tokenizer.decode(out[0, len(started):]) == tokenizer.decode(tokenizer(" upper pole", add_special_tokens=False)["input_ids"][:3])
    with pytest.raises(ValueError, match="volume_words_copy_bias"):
        type(engine.model.config)(volume_words_copy_bias=-1.0)


def test_an_option_is_scored_with_the_bias_decoding_it_would_have_had():
    """``along`` adds, at each token of a teacher-forced option, what the logits processor adds
    when that option is decoded token by token."""
    bias = EvidenceCopyBias([1, 2, 3, 4, 2, 3, 5], 2.0, prompt_length=0)
    option = [1, 2, 3, 5]
    logits = torch.randn(len(option), 8)
    along = bias.along(option, logits)
    for step in range(len(option)):
        decoded = bias(torch.tensor([option[:step]], dtype=torch.long), logits[step : step + 1].clone())
        torch.testing.assert_close(along[step : step + 1], decoded)
    assert float(along[2, 3] - logits[2, 3]) == pytest.approx(2.0)  # after "1 2": 3
    assert along[3].sub(logits[3]).abs().argmax() == 4 and float(along[3].sub(logits[3]).abs().sum()) == pytest.approx(2.0)
    assert EvidenceCopyBias(option, 0.0, 0).along(option, logits) is logits


def test_the_engine_reads_out_the_option_the_evidence_words_name(tiny_tghmoe_folder):
    """With the copy bias, a closed question's option that the evidence words hold is the one the
    engine ranks first; without it (bias 0) the same options keep the model's own order."""
    from napari_tghmoe.engine import InferenceEngine

    engine = InferenceEngine.from_pretrained(tiny_tghmoe_folder)
    tokenizer = engine.tokenizer
    prompt = torch.tensor([tokenizer("Where is the renal cyst?", add_special_tokens=False)["input_ids"]])
    kwargs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "mm_token_type_ids": torch.zeros_like(prompt)}
    choices = [("A", "left kidney, lower pole"), ("B", "left kidney, upper pole")]
    plain = engine.rank_choices(kwargs, choices)
    engine.model.config.volume_words_copy_bias = 1e4
    for named in ("upper pole", "lower pole"):
        words = f"3D encoder: axial series. Found: 22 mm renal cyst in the left kidney, {named}."
        scores = engine.rank_choices(kwargs, choices, copy_bias=engine._copy_bias(words, prompt.shape[1]))
        assert max(scores, key=scores.__getitem__) == ("B" if named == "upper pole" else "A")
    assert engine.rank_choices(kwargs, choices, copy_bias=None) == plain
