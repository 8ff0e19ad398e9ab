"""Will the model fit? The device picker's check, without Qt (``conversation.device_fits``).

Why: on the CPU, loading a model that does not fit ends in the kernel's out-of-memory killer and
takes napari with it; the chat dock shows each device choice's need against what is free and
refuses a choice that does not fit before any weight is read.
"""

from __future__ import annotations

import pytest

from napari_tghmoe.conversation import (
    DEVICE_CHOICES,
    ModelChoice,
    ModelDoesNotFit,
    ModelLoadFailed,
    device_fits,
    load_engine_if_fits,
)

GIB = 2**30


def test_every_choice_says_what_it_needs_of_what_is_free(tiny_tghmoe_folder):
    fits = device_fits(tiny_tghmoe_folder, available=12 * GIB)
    assert set(fits) == set(DEVICE_CHOICES)
    cpu = fits["CPU"]
    assert cpu.fits is True and not cpu.refused
    assert cpu.summary.startswith("~") and cpu.summary.endswith("of 12.0 GiB free (fp32 on cpu)")
    assert cpu.report.needed_bytes < GIB  # the tiny model: "~267 MiB", not "~0.3 GiB"
    assert "MiB of" in cpu.summary


def test_too_little_free_memory_marks_the_choice_with_both_numbers(tiny_tghmoe_folder):
    fits = device_fits(tiny_tghmoe_folder, available=50 * 2**20)
    cpu = fits["CPU"]
    assert cpu.fits is False and cpu.refused
    assert cpu.summary.startswith("does not fit: needs ") and ", 50 MiB free (fp32 on cpu)" in cpu.summary


def test_a_folder_that_is_not_a_model_is_not_checked(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    fits = device_fits(tmp_path, available=GIB)
    assert all(f.report is None and not f.refused and f.fits is None for f in fits.values())
    assert fits["CPU"].summary == "not checked: no config.json: not a transformers model folder"


def test_loading_a_choice_that_does_not_fit_is_refused_before_any_load(tiny_tghmoe_folder, monkeypatch):
    from napari_tghmoe import conversation

    loads = []
    monkeypatch.setattr(conversation, "load_engine", lambda choice: loads.append(choice))
    with pytest.raises(ModelDoesNotFit) as refused:
        load_engine_if_fits(ModelChoice(str(tiny_tghmoe_folder), "CPU"), available=2**20)
    assert loads == []
    err = refused.value
    assert isinstance(err, ModelLoadFailed)  # the dock's one error path for a failed load
    message = str(err)
    assert message.startswith(f"Cannot load model {tiny_tghmoe_folder}: not enough memory to load it in fp32")
    assert "needs about" in message and "free" in message
    assert err.fit.choice == "CPU" and set(err.fits) == set(DEVICE_CHOICES)

    load_engine_if_fits(ModelChoice(str(tiny_tghmoe_folder), "CPU"), available=64 * GIB)  # enough: loads
    assert [c.device for c in loads] == ["CPU"]
