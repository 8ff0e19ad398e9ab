"""npe2 writer: the latest TGH-MoE report of a CT layer -> .txt / .md / .json / DICOM SR (.dcm).

The chat dock keeps the report of the last answer about a layer in
``layer.metadata["tghmoe_report"]`` (a de-identified :class:`ReportDocument`), so File >
Save Selected Layers... can write it like any other file. Formats and privacy rules are
those of :mod:`napari_tghmoe.report`; an existing file is never replaced.
"""

from __future__ import annotations

from typing import Any

REPORT_METADATA_KEY = "tghmoe_report"
REPORT_SUFFIXES = (".txt", ".md", ".json", ".dcm")


def write_report(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write the layer's latest report to ``path`` (format from the suffix)."""
    from napari_tghmoe.report import ReportDocument, export_report

    document = (meta.get("metadata") or {}).get(REPORT_METADATA_KEY)
    if isinstance(document, dict):
        document = ReportDocument.from_dict(document)
    if not isinstance(document, ReportDocument):
        name = meta.get("name", "this layer")
        raise ValueError(f"{name!r} has no TGH-MoE report yet: ask the model about it in the chat dock first")
    return [str(export_report(document, path))]
