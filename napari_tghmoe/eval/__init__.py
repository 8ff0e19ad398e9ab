"""Evaluation by the M3D protocol (BLEU, ROUGE, METEOR, BERTScore, closed-VQA accuracy)
plus finding recall/precision for phantom reports. See :mod:`.metrics` and :mod:`.evaluate`.
"""
