"""The de-identified allow-list copied from DICOM headers into ``CTVolume.metadata``.

An allow-list (not a block-list): only acquisition facts a radiologist or the model needs
are copied. Names, IDs, dates, accession numbers, institutions, physicians, addresses
and free-text comments never leave the file, whatever the header holds.
"""

from __future__ import annotations

from typing import Any

#: DICOM keyword -> metadata key. Nothing else is ever copied.
ALLOWED_DICOM_KEYWORDS: dict[str, str] = {
    "Modality": "modality",
    "BodyPartExamined": "body_part",
    "SeriesDescription": "series_description",
    "StudyDescription": "study_description",
    "KVP": "kvp",
    "SliceThickness": "slice_thickness_mm",
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "manufacturer_model",
    "ConvolutionKernel": "convolution_kernel",
    "ContrastBolusAgent": "contrast_agent",
    "ContrastBolusRoute": "contrast_route",
    "XRayTubeCurrent": "tube_current_ma",
    "Exposure": "exposure_mas",
    "ReconstructionDiameter": "reconstruction_diameter_mm",
    "SpiralPitchFactor": "spiral_pitch_factor",
    "PatientPosition": "patient_position",
    "ImageType": "image_type",
    "ScanOptions": "scan_options",
    "FilterType": "filter_type",
    "SOPClassUID": "sop_class_uid",
}


def _plain(value: Any) -> Any:
    """pydicom values -> JSON-friendly Python values."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        items = [_plain(v) for v in value]
        return items[0] if len(items) == 1 else items
    if type(value).__name__ in {"DSfloat", "DSdecimal"}:
        return float(value)
    if type(value).__name__ == "IS":
        return int(value)
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    return text


def dicom_metadata(dataset: Any, source_format: str) -> dict[str, Any]:
    """Allow-listed fields of a pydicom dataset (enhanced CT: also its functional groups)."""
    metadata: dict[str, Any] = {"source_format": source_format}
    for keyword, key in ALLOWED_DICOM_KEYWORDS.items():
        value = dataset.get(keyword)
        if value is None or value == "":
            value = _from_functional_groups(dataset, keyword)
        if value is None or value == "":
            continue
        plain = _plain(value)
        if plain not in ("", None, []):
            metadata[key] = plain
    return metadata


def _from_functional_groups(dataset: Any, keyword: str) -> Any:
    """Enhanced CT keeps acquisition facts in shared functional group macros."""
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if not shared:
        return None
    for macro in shared[0]:
        if macro.VR != "SQ" or not macro.value:
            continue
        value = macro.value[0].get(keyword)
        if value not in (None, ""):
            return value
    return None
