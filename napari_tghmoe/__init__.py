"""napari-tghmoe: ask a local 3D medical multimodal model (TGH-MoE) about a CT scan in napari.

Importing the package is cheap: torch, transformers and Qt load only inside the functions
that need them, so napari starts fast.
"""

__version__ = "0.1.0"
