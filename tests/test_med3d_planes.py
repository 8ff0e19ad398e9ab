"""Training data in every plane: a phantom stored coronal, sagittal or oblique reaches a network
as the cascade will show it the stored scan (napari_tghmoe.med3d.data.segmentation_view)."""

from __future__ import annotations

import numpy as np
import pytest

SMALL = "spacing=8x8x8"


def test_a_phantom_spec_names_its_plane_and_stays_axial_by_default():
    from napari_tghmoe.med3d.data import parse_phantom_spec

    assert parse_phantom_spec(f"phantom:seeds=0-1,region=both,{SMALL}")["plane"] == "axial"
    assert parse_phantom_spec(f"phantom:seeds=0-1,{SMALL},plane=sagittal")["plane"] == "sagittal"
    assert parse_phantom_spec(f"phantom:seeds=0-1,{SMALL},plane=drawn")["plane"] is None  # drawn from each seed
    with pytest.raises(ValueError, match="plane must be one of .* or drawn, got 'tilted'"):
        parse_phantom_spec(f"phantom:seeds=0-1,{SMALL},plane=tilted")


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_a_reordered_phantom_is_seen_as_its_axial_twin(plane):
    """Coronal and sagittal storage only reorders the patient's grid: the networks' view of it is
    the axial phantom's grid, voxel for voxel."""
    from napari_tghmoe.med3d.data import segmentation_view
    from napari_tghmoe.phantom import make_phantom

    axial = make_phantom(3, "abdomen", spacing=(8.0, 8.0, 8.0), plane="axial")
    stored = make_phantom(3, "abdomen", spacing=(8.0, 8.0, 8.0), plane=plane)
    assert stored.volume.shape != axial.volume.shape or not np.array_equal(stored.labels, axial.labels)
    seen = segmentation_view(stored)
    assert seen.plane == "axial"
    assert seen.volume.spacing == axial.volume.spacing
    assert np.array_equal(seen.labels, axial.labels)
    assert np.array_equal(seen.lesions, axial.lesions)
    assert len(seen.findings) == len(axial.findings)
    for number, finding in enumerate(seen.findings, start=1):
        assert seen.lesions[finding.center_voxel] == number  # each centre on its own lesion


def test_an_oblique_phantom_is_seen_on_the_grid_segmentation_uses():
    """The view of an oblique phantom is the volume segment_volume's networks read (same grid,
    same HU), with its labels and lesions carried there, each finding's centre on its lesion."""
    from napari_tghmoe.med3d.data import segmentation_view
    from napari_tghmoe.med3d.segment import _oblique_on_grid, is_oblique, patient_axis_grid
    from napari_tghmoe.phantom import make_phantom

    stored = next(
        p for p in (make_phantom(seed, "abdomen", spacing=(5.0, 5.0, 5.0), plane="oblique") for seed in range(6)) if p.findings
    )
    assert is_oblique(stored.volume.direction)
    seen = segmentation_view(stored)
    expected, _ = _oblique_on_grid(stored.volume, patient_axis_grid(stored.volume))
    assert not is_oblique(seen.volume.direction)
    assert np.array_equal(seen.volume.hu, expected.hu)
    assert seen.volume.spacing == expected.spacing
    assert seen.labels.shape == seen.lesions.shape == seen.volume.shape
    assert set(np.unique(seen.labels)) <= set(np.unique(stored.labels))  # nearest neighbour: no new values
    for number, finding in enumerate(seen.findings, start=1):
        assert (seen.lesions == number).any()
        assert seen.lesions[finding.center_voxel] == number


def test_an_axial_phantom_is_its_own_view():
    from napari_tghmoe.med3d.data import iter_phantoms, segmentation_view

    phantom = next(iter_phantoms(f"phantom:seeds=5-5,region=chest,{SMALL}"))
    assert segmentation_view(phantom) is phantom
