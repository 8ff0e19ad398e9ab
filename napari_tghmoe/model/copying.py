"""Evidence copy bias: a decoding-time pointer to the evidence line (issue 15, fourth round).

Why: once the demo model stopped inventing findings (faithful report targets), 14 of the 16 findings
it still stated beyond its evidence words were the words' own findings with a neighbouring site
("spleen, upper pole" for the words' "spleen, lower pole"): the 3-layer LLM copies the kind but
not always the last word of the site. A pointer-generator (See et al., 2017, "Get To The Point")
mixes a copy distribution over the source into the vocabulary distribution; this is its simplest
decoding-time form. When the last ``min_match`` or more generated tokens also occur in the
evidence words, the token that follows them there gets ``bias`` added to its logit. The model still
decides what to state and when to stop; the bias only makes a phrase it has begun to copy end the
way the evidence line ends it. ``TGHMoEConfig.volume_words_copy_bias`` sets it (0: off).

The engine reads a multiple-choice option as it would decode it: the option's tokens are scored
with the same bias at each step (:meth:`EvidenceCopyBias.along`), so "right kidney, lower pole"
after the words' "renal cyst in the right kidney, lower pole" is as likely to be read out as it is
to be written (issue 15, fifth round).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def continuations(source: Sequence[int], generated: Sequence[int], min_match: int = 2) -> set[int]:
    """Tokens that follow, in ``source``, the longest suffix of ``generated`` (at least
    ``min_match`` tokens) that occurs there; empty when no such suffix occurs."""
    source, generated = list(source), list(generated)
    longest = min(len(generated), len(source) - 1)
    for n in range(longest, min_match - 1, -1):
        suffix = generated[-n:]
        following = {source[i + n] for i in range(len(source) - n) if source[i : i + n] == suffix}
        if following:
            return following
    return set()


class EvidenceCopyBias:
    """A ``transformers`` logits processor: ``bias`` on each token that continues, in the evidence
    words, the phrase the answer is in the middle of (:func:`continuations`)."""

    def __init__(self, words_ids: Sequence[int], bias: float, prompt_length: int, min_match: int = 2) -> None:
        self.words_ids = [int(t) for t in words_ids]
        self.bias = float(bias)
        self.prompt_length = int(prompt_length)
        self.min_match = int(min_match)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.bias == 0.0 or not self.words_ids:
            return scores
        for row in range(input_ids.shape[0]):
            generated = input_ids[row, self.prompt_length :].tolist()
            for token in continuations(self.words_ids, generated, self.min_match):
                if token < scores.shape[-1]:
                    scores[row, token] += self.bias
        return scores

    def along(self, tokens: Sequence[int], logits: Any) -> Any:
        """``logits`` (one row per token of ``tokens``, each row the scores before that token) with
        the bias that decoding ``tokens`` one by one would have added at each step."""
        if self.bias == 0.0 or not self.words_ids:
            return logits
        logits = logits.clone()
        tokens = [int(t) for t in tokens]
        for step in range(len(tokens)):
            for token in continuations(self.words_ids, tokens[:step], self.min_match):
                if token < logits.shape[-1]:
                    logits[step, token] += self.bias
        return logits
