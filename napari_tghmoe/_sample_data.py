"""napari sample data: chest and abdomen CT phantoms, and real CT slices from pydicom-data.

The phantoms are clinical-like scans (5 mm slices, 0.75 mm pixels, field of view cropped
to the body) with known findings; the report and findings are kept in the layer metadata
(``phantom_report``, ``phantom_findings``) so a user can compare the model's answer.
"""

from __future__ import annotations

from typing import Any

from napari_tghmoe.io._types import CTVolume

#: Real CT images shipped by the optional ``pydicom-data`` package (no download).
PYDICOM_DATA_CT_FILES = ("explicit_VR-UN.dcm", "693_UNCR.dcm")
SAMPLE_SEED = 0

LayerDataList = list[tuple[Any, dict[str, Any], str]]


def phantom_volume(region: str = "chest", seed: int = SAMPLE_SEED) -> CTVolume:
    """The phantom CTVolume the sample data and the demo open."""
    return _phantom(region, seed).volume


def _phantom(region: str, seed: int) -> Any:
    from napari_tghmoe.phantom import make_phantom

    return make_phantom(seed, region=region)


def _phantom_layer(region: str) -> LayerDataList:
    from napari_tghmoe.layers import ct_layer_data

    phantom = _phantom(region, SAMPLE_SEED)
    data, kwargs, layer_type = ct_layer_data(phantom.volume)
    kwargs["metadata"]["phantom_report"] = phantom.report
    kwargs["metadata"]["phantom_findings"] = [finding.kind for finding in phantom.findings]
    return [(data, kwargs, layer_type)]


def chest_phantom() -> LayerDataList:
    """Chest CT phantom (lungs, mediastinum, upper abdomen) with known findings."""
    return _phantom_layer("chest")


def abdomen_phantom() -> LayerDataList:
    """Abdomen CT phantom (liver, spleen, kidneys, bowel) with known findings."""
    return _phantom_layer("abdomen")


def pydicom_data_ct_path() -> str | None:
    """Path of a real CT slice from ``pydicom-data`` when installed (never downloads)."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover - pydicom is a dependency
        return None
    for name in PYDICOM_DATA_CT_FILES:
        try:
            path = get_testdata_file(name, download=False)
        except Exception:  # noqa: BLE001 - any lookup failure means "not available"
            path = None
        if path:
            return str(path)
    return None


def real_ct_slice() -> LayerDataList:
    """A real 512x512 abdominal CT slice (pydicom-data), as a one-slice volume.

    Raises a one-line error (napari shows it as a notification) when pydicom-data is
    missing: sample data has no "nothing to add" value.
    """
    from napari_tghmoe.io import load_volume
    from napari_tghmoe.io._types import VolumeReadError
    from napari_tghmoe.layers import ct_layer_data, layer_name

    path = pydicom_data_ct_path()
    if path is None:
        raise VolumeReadError(
            "pydicom-data", "the real CT sample needs the optional package pydicom-data"
        )
    volume = load_volume(path, allow_2d=True)
    return [ct_layer_data(volume, name=f"{layer_name(volume)} (real CT, pydicom-data)")]
