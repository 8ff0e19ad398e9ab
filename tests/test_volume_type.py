"""CTVolume geometry follows the documented LPS convention."""

import numpy as np
import pytest

from napari_tghmoe.io import AXIAL_DIRECTION, CTVolume, VolumeReadError


def test_index_to_patient_uses_spacing_and_direction():
    vol = CTVolume(hu=np.zeros((4, 5, 6), np.int16), spacing=(5.0, 0.5, 0.7), origin=(-10, 20, 30))
    # one step along x (i) moves towards patient left by 0.7 mm, one slice up by 5 mm
    assert np.allclose(vol.index_to_patient((0, 0, 1)), (-9.3, 20, 30))
    assert np.allclose(vol.index_to_patient((1, 0, 0)), (-10, 20, 35))
    assert np.allclose(vol.napari_translate(), (30, 20, -10))
    assert vol.shape == (4, 5, 6)
    assert np.allclose(vol.extent_mm, (20, 2.5, 4.2))
    assert np.array_equal(vol.direction, AXIAL_DIRECTION)


def test_ctvolume_refuses_non_3d():
    with pytest.raises(ValueError):
        CTVolume(hu=np.zeros((4, 5)))


def test_volume_read_error_names_path_and_reason():
    err = VolumeReadError("/data/scan.dcm", "file is empty (0 bytes)")
    assert isinstance(err, ValueError)
    assert str(err) == "/data/scan.dcm: file is empty (0 bytes)"
    assert err.path == "/data/scan.dcm"
