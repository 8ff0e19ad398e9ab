"""npe2 reader: DICOM folders and files, NIfTI, MetaImage and NRRD -> a CT image layer.

A file we cannot read becomes one napari error notification naming the file and the
reason (``VolumeReadError``), and the reader returns napari's "read, but nothing to add"
sentinel ``[(None,)]``: raising instead would make napari show a traceback and offer
other readers, which is not what a radiologist should see. Every warning the reader records
(tilt, gaps, resampling, not CT, dropped images, 4D, values not HU) becomes a warning
notification naming the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_tghmoe.io._types import VolumeReadError

#: Suffixes read as volumes (besides DICOM folders and DICOM files).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_NULL_LAYER = [(None,)]  # napari/npe2: "accepted and read, no layer to add"

LayerDataList = list[tuple[Any, ...]]


def has_dicom_preamble(path: str | Path) -> bool:
    """True when the file has the 128-byte preamble followed by ``DICM`` (Part 10)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def can_read(path: str | Path) -> bool:
    """Whether this plugin should try ``path`` (cheap: looks at names and 132 bytes)."""
    path = Path(path)
    if path.is_dir():
        return True
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES) or name.endswith(DICOM_SUFFIXES):
        return True
    return path.is_file() and has_dicom_preamble(path)


def get_reader(path: str | list[str]) -> Callable[[Any], LayerDataList] | None:
    """npe2 ``get_reader``: ``read_ct`` for paths we can read, None for the rest."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return read_ct if can_read(path) else None


def read_ct(path: str | list[str]) -> LayerDataList:
    """Read one CT path into a layer data tuple; errors become a notification."""
    from napari.utils.notifications import show_error, show_warning

    from napari_tghmoe.io import load_volume
    from napari_tghmoe.layers import ct_layer_data, layer_name

    if isinstance(path, (list, tuple)):
        path = path[0]
    try:
        volume = load_volume(path)
    except VolumeReadError as err:
        show_error(f"Cannot open CT: {err}")
        return list(_NULL_LAYER)
    except MemoryError:
        show_error(f"Cannot open CT: {path}: not enough memory for this volume")
        return list(_NULL_LAYER)
    except Exception as err:  # noqa: BLE001 - a reader bug must not become napari's "raised by all plugins"
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
        show_error(f"Cannot open CT: {path}: unexpected error ({reason})")
        return list(_NULL_LAYER)
    for warning in volume.warnings:
        show_warning(f"{layer_name(volume)}: {warning}")
    return [ct_layer_data(volume)]
