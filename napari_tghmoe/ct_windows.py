"""The CT windows the project names, in HU as (centre, width), in one place.

A window maps the HU range ``centre +- width / 2`` to black..white; radiologists name them ("lung",
"soft tissue"). The viewer's presets (:data:`napari_tghmoe.layers.WINDOW_PRESETS`), the model's
three input channels (:mod:`napari_tghmoe.model.preprocess`), the HU <-> [0, 1] mapping of
M3D-style volumes and the phantoms' display window all read them from here, so "soft tissue"
means one thing everywhere. Pure constants: importing this module imports nothing.
"""

from __future__ import annotations

LUNG = (-600.0, 1500.0)
MEDIASTINUM = (50.0, 350.0)
SOFT_TISSUE = (40.0, 400.0)
LIVER = (90.0, 150.0)
BONE = (400.0, 1800.0)
BRAIN = (40.0, 80.0)

#: Every named window, in the order the viewer's window/level dock lists them.
NAMED_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": LUNG,
    "mediastinum": MEDIASTINUM,
    "soft tissue": SOFT_TISSUE,
    "liver": LIVER,
    "bone": BONE,
    "brain": BRAIN,
}

#: The model's input channels (R, G, B): lung, soft tissue (mediastinum/abdomen), bone.
MODEL_INPUT_WINDOWS = (LUNG, SOFT_TISSUE, BONE)
