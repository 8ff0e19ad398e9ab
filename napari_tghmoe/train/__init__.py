"""Two-stage training of TGH-MoE: recipes, the trainer, collation, the vision probe.

Kept light: importing this package imports neither torch nor transformers. The data it trains on
(samples, loaders, phrasings) is :mod:`napari_tghmoe.datasets`, shared with evaluation;
:mod:`napari_tghmoe.train.collate` turns samples into model batches.
"""
