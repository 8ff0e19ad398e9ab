"""Training data and (later) two-stage training of TGH-MoE.

Kept light: importing this package imports neither torch nor transformers; see
:mod:`napari_tghmoe.train.data` (samples, loaders, collation) and
:mod:`napari_tghmoe.train.phrasings` (report requests and question framings).
"""
