"""The pre-trained 3D encoder's tokens beside the video tokens: a 3D eye married to the 2D MLLM.

A Med3DInsight segmentation model (``napari_tghmoe.med3d``) reads the CT at its own working
spacing; its bottleneck feature map, stitched over windows that cover the body, is average-pooled
to ``volume_tokens_grid`` (one token per cell), and its finding-presence head's probabilities are
appended to every token (the 3D encoder is what was trained to see lesions). A
:class:`VolumeTokenProjector` maps each token into the LLM's input-embedding space: E small MLP
experts mixed by a softmax gate over the same instruction vector ``t`` that drives the MoE's level
1 (so the question chooses how the 3D evidence is read), plus a learned embedding per token
position. The prompt carries ``<|vision_start|>`` + N placeholders + ``<|vision_end|>`` after the
video block, and the projected tokens replace the placeholders' input embeddings (a hook on the
LLM's embedding module, prefill only), so Qwen's own forward, rope index and ``generate()`` are
untouched and no base tensor changes.

The placeholder: ``<|vision_pad|>`` (Qwen2.5-VL reserves it and never uses it; the processor and
the chat template do not emit it). A tokenizer without it gets it added when the embedding table
has an unused row; the small tokenizers of the bundled demo and the tests fill their tables to the
last row and carry only the seven specials of the prompt, so there the pad token
(``<|endoftext|>``) is the placeholder: only attended positions count, so right or left padding is
never taken for a volume token. ``<|image_pad|>`` is never used: Qwen's forward reads it as image
positions.

The encoder stays outside the module tree (``model.volume_encoder``): it is not in
``state_dict()`` or ``parameters()``, so saving, training and ``set_stage`` leave its weights alone;
it lives in its own sub-folder of the model folder and runs on the CPU in float32.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

#: The placeholder token of the volume tokens (Qwen2.5-VL's reserved, unused ``vision_token_id``).
VOLUME_PAD_TOKEN = "<|vision_pad|>"
#: Sub-folder name the encoder is copied to inside a TGH-MoE model folder.
DEFAULT_ENCODER_FOLDER = "volume_encoder"


class VolumeEncoderError(ValueError):
    """A volume encoder that cannot be used (one line naming the folder and the reason)."""


class VolumeTokenProjector(nn.Module):
    """3D encoder tokens (+ finding presences) -> LLM input embeddings, mixed by the instruction.

    ``forward(features (B, N, C + K), text (B, D_text)) -> (tokens (B, N, D), gate (B, E))``:
    the C encoder channels are layer-normalised (their scale is the encoder's business), the K
    presences in [0, 1] pass as they are; expert e is ``Linear -> GELU -> Linear``; the gate is
    ``softmax(W t + b)``. The experts' last layer and the position table start at zero, so a
    freshly attached projector adds zero vectors: the answers change only by the attention the
    inserted tokens receive.
    """

    def __init__(
        self,
        encoder_channels: int,
        presence_features: int,
        hidden_size: int,
        text_size: int,
        num_tokens: int,
        num_experts: int,
        expert_hidden: int,
        verbal: bool = False,
    ) -> None:
        super().__init__()
        self.encoder_channels = int(encoder_channels)
        features = self.encoder_channels + int(presence_features)
        # evidence tokens (no encoder channels) are already on a fixed scale: nothing to normalise
        self.norm = nn.LayerNorm(self.encoder_channels) if self.encoder_channels else nn.Identity()
        self.w_in = nn.Parameter(torch.empty(num_experts, features, expert_hidden))
        self.b_in = nn.Parameter(torch.empty(num_experts, expert_hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, expert_hidden, hidden_size))
        self.b_out = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.position = nn.Parameter(torch.empty(num_tokens, hidden_size))
        self.gate = nn.Linear(text_size, num_experts)
        # evidence tokens: a linear path from the named features (a kind, an organ, a site) that
        # starts at the names' word embeddings (init_verbal_path), so a finding token first reads
        # to the LLM like the words of what was found, and the MLP experts learn the rest
        if verbal:
            self.verbal = nn.Parameter(torch.zeros(features - self.encoder_channels, hidden_size))
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return int(self.w_in.shape[0])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's scale for the first layers and the gate, zeros for what adds to the LLM.

        ``transformers.initialization`` leaves tensors that ``from_pretrained`` loaded alone.
        """
        if isinstance(self.norm, nn.LayerNorm):
            init.ones_(self.norm.weight)
            init.zeros_(self.norm.bias)
        bound_in = 1.0 / math.sqrt(self.w_in.shape[1])
        init.uniform_(self.w_in, -bound_in, bound_in)
        init.uniform_(self.b_in, -bound_in, bound_in)
        init.zeros_(self.w_out)
        init.zeros_(self.b_out)
        init.zeros_(self.position)
        if "verbal" in self._parameters:
            init.zeros_(self.verbal)
        bound_text = 1.0 / math.sqrt(self.gate.weight.shape[1])
        init.uniform_(self.gate.weight, -bound_text, bound_text)
        init.zeros_(self.gate.bias)

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.w_in.dtype
        features = features.to(device=self.w_in.device, dtype=dtype)
        encoded, presence = features[..., : self.encoder_channels], features[..., self.encoder_channels :]
        x = torch.cat([self.norm(encoded), presence], dim=-1)  # (B, N, F)
        gate = self.gate(text.to(device=self.w_in.device, dtype=dtype)).float().softmax(-1)  # (B, E)
        hidden = F.gelu(torch.einsum("bnf,efh->bneh", x, self.w_in) + self.b_in)
        experts = torch.einsum("bneh,eho->bneo", hidden, self.w_out) + self.b_out  # (B, N, E, D)
        tokens = (experts * gate.to(dtype)[:, None, :, None]).sum(2) + self.position
        if "verbal" in self._parameters:
            tokens = tokens + presence @ self.verbal
        return tokens, gate

    @torch.no_grad()
    def init_verbal_path(self, named_features: dict[int, str], embeddings: torch.Tensor, tokenizer: Any) -> int:
        """Row i of the verbal path := the mean input embedding of the words ``named_features[i]``
        (indices into the non-encoder features). Returns how many rows were set."""
        if "verbal" not in self._parameters:
            raise ValueError("this projector has no verbal path (only evidence tokens have one)")
        done = 0
        for index, text in named_features.items():
            ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
            if ids:
                self.verbal[int(index)] = embeddings[torch.tensor(ids)].mean(0).to(self.verbal.dtype)
                done += 1
        return done


def build_projector(config: Any) -> VolumeTokenProjector:
    """The projector a ``TGHMoEConfig`` with a volume encoder describes (fresh weights)."""
    hidden = int(config.text_config.hidden_size)
    return VolumeTokenProjector(
        encoder_channels=int(config.volume_encoder_channels),
        presence_features=int(config.volume_presence_features),
        hidden_size=hidden,
        text_size=hidden,
        num_tokens=int(config.num_volume_tokens),
        num_experts=int(config.volume_projector_experts),
        expert_hidden=int(config.volume_projector_hidden or hidden),
        verbal=getattr(config, "volume_token_source", "encoder") == "evidence",
    )


# --------------------------------------------------------------------------- the encoder


class EvidenceReader:
    """The "evidence" volume encoder: a whole segmentation cascade whose findings become tokens.

    ``features(volume)`` segments the CT (:func:`napari_tghmoe.med3d.segment.segment_volume`),
    sums it up (:func:`napari_tghmoe.med3d.evidence.scan_evidence`) and returns
    :func:`~napari_tghmoe.med3d.evidence.evidence_tokens`. Segmenting takes seconds, so the
    evidence is kept per scan: in memory for the last few volumes asked about, and on disk when
    ``TGHMOE_EVIDENCE_CACHE`` names a folder and the volume came from a file (JSON named after
    the file; training and evaluation fill it once, ``scripts/scan_evidence.py`` in parallel).
    It has no trainable weights: the cascade stays frozen in its folder.

    The chat shares segmentations with it both ways: :meth:`segmentation` gives the
    ``SegmentationResult`` of the last scan it segmented (the chat places the findings an answer
    states with it instead of segmenting again), and :meth:`adopt` takes a segmentation made
    elsewhere (the Segment dock, an earlier finding-link run) as a scan's evidence instead of
    segmenting, but only one made by this very cascade (:meth:`same_cascade`): the site head and
    the chat model's training assume its findings.
    """

    memory_size = 4

    def __init__(self, folder: str | Path, max_findings: int, words_min_certainty: float = 0.5) -> None:
        import threading

        from napari_tghmoe.med3d.encoder import load_seg_model

        self.folder = Path(folder)
        self.config = load_seg_model(self.folder).config  # a bad folder fails here, with its name
        if not self.config.finding_model:
            raise VolumeEncoderError(f"{self.folder}: evidence tokens need a cascade (organ + finding model)")
        self.max_findings = int(max_findings)
        self.words_min_certainty = float(words_min_certainty)
        # (the scan's voxel array, its evidence); the array is held, so its id is never reused
        self._memory: list[tuple[Any, Any]] = []
        # the last segmentation this reader made or adopted, with the voxel array it is of: one
        # label map at most (the chat takes it right after the answer and keeps it while the scan lives)
        self._segmented: tuple[Any, Any] | None = None
        self._lock = threading.Lock()  # the chat adopts on one thread while another may read
        from napari_tghmoe.med3d.sites import PhaseHead, SiteHead

        # None until trained (scripts/train_sites.py writes them into the cascade's folder)
        self.site_head = SiteHead.load(self.folder)
        self.phase_head = PhaseHead.load(self.folder)

    def parameters(self):  # the frozen cascade is not the chat model's to train or save anew
        return iter(())

    def _remembered(self, key: Any) -> Any:
        for held, found in self._memory:
            if held is key:
                return found
        return None

    def _keep(self, key: Any, found: Any, result: Any = None) -> None:
        with self._lock:
            others = [(held, kept) for held, kept in self._memory if held is not key]
            self._memory = [*others[-(self.memory_size - 1) :], (key, found)]
            if result is not None:
                self._segmented = (key, result)

    def evidence(self, volume: Any) -> Any:
        """The scan's :class:`~napari_tghmoe.med3d.evidence.ScanEvidence` (cached, see the class)."""
        import json
        import os

        from napari_tghmoe.med3d.evidence import ScanEvidence, scan_evidence
        from napari_tghmoe.med3d.segment import segment_volume

        key = getattr(volume, "hu", volume)
        found = self._remembered(key)
        if found is not None:
            return found
        source = getattr(volume, "source", None)
        cache_dir = os.environ.get("TGHMOE_EVIDENCE_CACHE", "")
        cached = Path(cache_dir) / f"{Path(source).stem}.json" if cache_dir and source else None
        result = None
        if cached is not None and cached.is_file():
            found = ScanEvidence.from_json(json.loads(cached.read_text(encoding="utf-8")))
        else:
            result = segment_volume(volume, self.folder)
            found = scan_evidence(volume, result)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                staging = cached.with_suffix(f".{os.getpid()}.tmp")
                staging.write_text(json.dumps(found.to_json()), encoding="utf-8")
                os.replace(staging, cached)
        self._keep(key, found, result)
        return found

    def segmentation(self, volume: Any) -> Any:
        """The ``SegmentationResult`` this reader made (or adopted) of ``volume``'s voxels when it
        is the last one, else None (e.g. evidence read from the disk cache carries no label map)."""
        held = self._segmented
        if held is None or held[0] is not getattr(volume, "hu", volume):
            return None
        return held[1]

    def same_cascade(self, folder: str | Path | None) -> bool:
        """``folder`` (None: the segmenter's default, the bundled demo cascade) holds the networks of
        this reader's cascade: organ model, finding model and verifier, configs and weights byte for
        byte (:func:`cascade_fingerprint`), wherever the copy lies (the demo model's
        ``volume_encoder/`` is a copy of ``resources/demo-seg-model``). The site and phase heads are
        not compared: they read a segmentation, they do not make it."""
        from napari_tghmoe.med3d.segment import _resolve_model_dir  # the rule segment_volume applies

        theirs = _resolve_model_dir(folder)
        if theirs.resolve() == self.folder.resolve():
            return True
        mine = cascade_fingerprint(self.folder)
        return mine is not None and cascade_fingerprint(theirs) == mine

    def adopt(self, volume: Any, result: Any, folder: str | Path | None) -> bool:
        """Take ``result``, a segmentation of ``volume`` made with the cascade in ``folder`` (None:
        not known), as the scan's evidence, so :meth:`evidence` does not segment it again.

        Refused (False) unless ``folder`` is known, the result names it (``model_name`` is the
        folder's name) and it holds this reader's cascade, and the label map is on ``volume``'s grid:
        evidence from another model's findings would be read by a site head and a chat model that
        never saw them. True also when the reader already holds the scan's evidence.
        """
        from napari_tghmoe.med3d.evidence import scan_evidence

        key = getattr(volume, "hu", None)
        if key is None or result is None or folder is None:
            return False
        if self._remembered(key) is not None:
            return True
        if str(getattr(result, "model_name", "")) != Path(folder).name:
            return False
        if tuple(np.shape(getattr(result, "labels", ()))) != tuple(np.shape(key)):
            return False
        if not self.same_cascade(folder):
            return False
        self._keep(key, scan_evidence(volume, result), result)
        return True

    def _scan(self, volume: Any, spacing: Any = None) -> Any:
        from napari_tghmoe.io import CTVolume

        if not hasattr(volume, "hu"):
            volume = _hu_axial(volume, spacing)  # an array: a CTVolume in HU (axial, no geometry)
        elif not isinstance(volume, CTVolume):  # pragma: no cover - duck-typed volumes
            volume = CTVolume(hu=np.asarray(volume.hu), spacing=tuple(volume.spacing), modality="CT")
        return self.evidence(volume)

    def features(self, volume: Any, spacing: Any = None) -> torch.Tensor:
        from napari_tghmoe.med3d.evidence import evidence_tokens

        return torch.from_numpy(evidence_tokens(self._scan(volume, spacing), self.max_findings, self.site_head))

    def words(self, volume: Any, spacing: Any = None) -> str:
        """The same evidence as the line of text that follows the volume tokens in the prompt."""
        from napari_tghmoe.med3d.evidence import evidence_words

        return evidence_words(
            self._scan(volume, spacing), self.site_head, self.phase_head,
            min_certainty=self.words_min_certainty, max_findings=self.max_findings,
        )


def load_volume_encoder(
    folder: str | Path, source: str = "encoder", max_findings: int = 6, words_min_certainty: float = 0.5
) -> Any:
    """A Med3DInsight segmentation model folder as a frozen encoder (CPU, fp32, eval mode), or for
    ``source="evidence"`` the whole cascade as an :class:`EvidenceReader`."""
    from napari_tghmoe.med3d.encoder import load_seg_model
    from napari_tghmoe.med3d.types import SegModelError

    folder = Path(folder)
    if source == "evidence":
        try:
            return EvidenceReader(folder, max_findings, words_min_certainty)
        except SegModelError as err:
            raise VolumeEncoderError(str(err)) from None
    try:
        encoder = load_seg_model(folder)
    except SegModelError as err:
        raise VolumeEncoderError(str(err)) from None
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise VolumeEncoderError(f"{folder}: the 3D encoder cannot be loaded ({type(err).__name__}: {err})") from None
    if encoder.config.context_groups:
        raise VolumeEncoderError(
            f"{folder}: a finding model that reads an organ model's labels; attach the organ model (the cascade's top folder)"
        )
    encoder.requires_grad_(False)
    return encoder


#: (resolved folder, its network files' sizes and times) -> fingerprint, so a folder is read once
_fingerprints: dict[tuple[Any, ...], str] = {}


def cascade_fingerprint(folder: str | Path) -> str | None:
    """A digest of what ``segment_volume`` loads from a cascade folder: every ``config.json`` and
    ``model.safetensors`` in it (organ model, finding model, verifier), by relative path and
    content. Two folders with the same fingerprint segment a scan alike. None for a folder that
    cannot be read or holds no network."""
    import hashlib

    folder = Path(folder)
    try:
        files = sorted(
            path for path in folder.rglob("*") if path.name in ("config.json", "model.safetensors") and path.is_file()
        )
        stamp = tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        key = (str(folder.resolve()), stamp)
        if not files:
            return None
        if key not in _fingerprints:
            digest = hashlib.sha256()
            for path in files:
                digest.update(str(path.relative_to(folder).as_posix()).encode("utf-8") + b"\0")
                with path.open("rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                digest.update(b"\0")
            _fingerprints[key] = digest.hexdigest()
        return _fingerprints[key]
    except OSError:
        return None


def _hu_axial(volume: Any, spacing: Any = None) -> Any:
    """The volume as an axially viewed ``CTVolume`` in HU (what the encoder was trained on)."""
    from napari_tghmoe.io import CTVolume
    from napari_tghmoe.med3d.segment import axial_view
    from napari_tghmoe.model.preprocess import INTENSITY_HU, _as_hu_and_spacing, unit_to_hu, volume_intensity

    values, spacing = _as_hu_and_spacing(volume, spacing)
    values = np.asarray(values, dtype=np.float32)
    kind = volume_intensity(volume if hasattr(volume, "hu") else values).kind
    if kind != INTENSITY_HU:  # [0, 1] display intensities (M3D): back to pseudo-HU
        values = unit_to_hu(torch.from_numpy(values)).numpy()
    direction = getattr(volume, "direction", None)
    if direction is not None:
        order, flips = axial_view(np.asarray(direction))
        values = np.transpose(values, order)
        for axis, flip in enumerate(flips):
            if flip:
                values = np.flip(values, axis=axis)
        spacing = tuple(spacing[a] for a in order)
    return CTVolume(hu=np.ascontiguousarray(values), spacing=tuple(float(s) for s in spacing), modality="CT")


def window_counts(size: Sequence[int], window: Sequence[int], max_windows: int) -> list[int]:
    """Windows per axis: enough to cover each axis, then fewer along the axis with the most
    until at most ``max_windows`` remain (the windows then spread out, leaving gaps)."""
    counts = [max(1, math.ceil(n / w)) for n, w in zip(size, window)]
    while math.prod(counts) > max(1, int(max_windows)):
        axis = max(range(3), key=lambda a: (counts[a], -a))
        counts[axis] -= 1
    return counts


def _window_starts(size: int, window: int, stride: int, count: int) -> list[int]:
    """``count`` window starts (multiples of ``stride``) spread evenly from 0 to ``size - window``."""
    if size <= window or count <= 1:
        return [max(0, (size - window) // 2 // stride * stride)]  # one window: the centre
    return sorted({int(round(i * (size - window) / (count - 1) / stride)) * stride for i in range(count)})


@torch.no_grad()
def encode_volume(
    encoder: Any, volume: Any, tokens_grid: Sequence[int], spacing: Any = None, max_windows: int = 4
) -> torch.Tensor:
    """(N, C + K) float32 features of one CT: pooled encoder bottleneck + finding presences.

    The CT goes to the encoder's working grid (``prepare_image``); windows of the encoder's
    patch size cover it (zero padding beyond, as in its sliding-window segmentation), at most
    ``max_windows`` of them (a window costs a few hundred ms on a CPU: a large CT is then seen
    through evenly spread windows with gaps between them); their bottleneck maps are stitched
    (overlaps averaged) into one map of the whole volume, cut to its extent and average-pooled to
    ``tokens_grid`` (z, y, x order) over the cells a window saw. A kind's presence is its highest
    window probability. ``volume``: a ``CTVolume`` or a (z, y, x) array with ``spacing``.
    """
    from napari_tghmoe.med3d.data import prepare_image

    config = encoder.config
    image, _ = prepare_image(_hu_axial(volume, spacing), config)
    stride = int(config.encoder_stride)
    window = [int(p) for p in config.patch_size]
    size = list(image.shape[1:])
    padded = [max(w, math.ceil(n / stride) * stride) for n, w in zip(size, window)]
    canvas = np.zeros((image.shape[0], *padded), dtype=np.float32)
    canvas[:, : size[0], : size[1], : size[2]] = image
    counts_per_axis = window_counts(padded, window, max_windows)
    starts = [_window_starts(n, w, stride, c) for n, w, c in zip(padded, window, counts_per_axis)]
    boxes = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    device = next(encoder.parameters()).device
    cells = [n // stride for n in padded]
    total = counts = None
    presence = None
    batch_size = max(1, int(config.sw_batch_size))
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first : first + batch_size]
        windows = np.stack(
            [canvas[:, z : z + window[0], y : y + window[1], x : x + window[2]] for z, y, x in chunk]
        )
        bottom, _ = encoder.backbone.encode(torch.from_numpy(windows).to(device))
        bottom = bottom.float()
        pooled = torch.cat([bottom.mean(dim=(2, 3, 4)), bottom.amax(dim=(2, 3, 4))], dim=1)
        window_presence = torch.sigmoid(encoder.finding_head(pooled).float()).amax(0).cpu()
        presence = window_presence if presence is None else torch.maximum(presence, window_presence)
        bottom = bottom.cpu()
        if total is None:
            total = torch.zeros(bottom.shape[1], *cells)
            counts = torch.zeros(1, *cells)
        for index, (z, y, x) in enumerate(chunk):
            cz, cy, cx = z // stride, y // stride, x // stride
            d, h, w = bottom.shape[2:]
            total[:, cz : cz + d, cy : cy + h, cx : cx + w] += bottom[index]
            counts[:, cz : cz + d, cy : cy + h, cx : cx + w] += 1
    assert total is not None and counts is not None and presence is not None
    extent = [max(1, math.ceil(n / stride)) for n in size]
    seen = (counts > 0).float()[:, : extent[0], : extent[1], : extent[2]]
    stitched = (total / counts.clamp(min=1))[:, : extent[0], : extent[1], : extent[2]]
    grid = tuple(int(g) for g in tokens_grid)
    # mean over the seen cells of each token's region (a region no window saw stays 0)
    tokens = F.adaptive_avg_pool3d(stitched[None], grid)[0] / F.adaptive_avg_pool3d(seen[None], grid)[0].clamp(min=1e-6)
    tokens = tokens.flatten(1).t()  # (N, C), cells in (z, y, x) order
    return torch.cat([tokens, presence[None].expand(tokens.shape[0], -1)], dim=1).float().contiguous()


class VolumeFeatureCache:
    """Encoder features per training volume, computed once (the encoder is frozen).

    Keyed by the sample's volume: its path, or the object itself (kept alive here, so its id is
    never reused) for a preloaded ``CTVolume`` or array.
    """

    def __init__(self, encoder: Any, tokens_grid: Sequence[int], max_windows: int = 4) -> None:
        self.encoder = encoder
        self.tokens_grid = [int(g) for g in tokens_grid]
        self.max_windows = int(max_windows)
        self._features: dict[Any, tuple[Any, torch.Tensor]] = {}
        self._words: dict[Any, str] = {}

    def __len__(self) -> int:
        return len(self._features)

    def words(self, sample: Any) -> str:
        """The evidence line of the sample's volume ("" for an encoder without one)."""
        from napari_tghmoe.datasets.volumes import load_sample_volume

        if not isinstance(self.encoder, EvidenceReader):
            return ""
        source = sample.volume
        key = str(source) if isinstance(source, (str, Path)) else id(source)
        if key not in self._words:
            self.features(sample)  # keeps the volume object alive under its id
            self._words[key] = self.encoder.words(load_sample_volume(sample))
        return self._words[key]

    def features(self, sample: Any) -> torch.Tensor:
        from napari_tghmoe.datasets.volumes import load_sample_volume

        source = sample.volume
        key = str(source) if isinstance(source, (str, Path)) else id(source)
        found = self._features.get(key)
        if found is None:
            volume = load_sample_volume(sample)
            if isinstance(self.encoder, EvidenceReader):
                features = self.encoder.features(volume)
            else:
                features = encode_volume(self.encoder, volume, self.tokens_grid, max_windows=self.max_windows)
            found = (source, features)
            self._features[key] = found
        return found[1]


# --------------------------------------------------------------------------- attaching


def choose_volume_token(tokenizer: Any, vocab_size: int, pad_token_id: int | None) -> tuple[int, bool]:
    """The placeholder's id, and whether ``<|vision_pad|>`` was added to ``tokenizer`` for it.

    ``<|vision_pad|>`` when the tokenizer has it (a real Qwen2.5-VL tokenizer); else added at the
    first unused row of the embedding table (``vocab_size`` rows), which no text maps to; else the
    pad token (see the module doc).
    """
    from tokenizers import AddedToken

    known = tokenizer.get_vocab()
    if VOLUME_PAD_TOKEN in known and int(known[VOLUME_PAD_TOKEN]) < int(vocab_size):
        return int(known[VOLUME_PAD_TOKEN]), False
    if VOLUME_PAD_TOKEN not in known and len(tokenizer) < int(vocab_size):
        tokenizer.add_tokens([AddedToken(VOLUME_PAD_TOKEN, special=True, normalized=False)], special_tokens=True)
        token_id = int(tokenizer.convert_tokens_to_ids(VOLUME_PAD_TOKEN))
        if token_id >= int(vocab_size):  # pragma: no cover - guarded by the length check
            raise VolumeEncoderError(f"{VOLUME_PAD_TOKEN} got id {token_id}, beyond the {vocab_size} embeddings")
        return token_id, True
    pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        raise VolumeEncoderError(
            f"no placeholder for the volume tokens: the tokenizer has no {VOLUME_PAD_TOKEN}, no unused embedding row "
            "and no pad token"
        )
    return int(pad), False


def reserve_volume_token(tokenizer: Any) -> int:
    """Add ``<|vision_pad|>`` to a tokenizer a model is about to be built for (its id)."""
    from tokenizers import AddedToken

    if VOLUME_PAD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(VOLUME_PAD_TOKEN, special=True, normalized=False)], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(VOLUME_PAD_TOKEN))


def attach_volume_encoder(
    model: Any,
    encoder_folder: str | Path,
    tokenizer: Any,
    *,
    tokens_grid: Sequence[int] | None = None,
    experts: int | None = None,
    hidden: int | None = None,
    name: str = DEFAULT_ENCODER_FOLDER,
    source: str | None = None,
) -> bool:
    """Give a TGH-MoE model a frozen 3D encoder and a fresh projector, in place.

    No base tensor (and no expert) changes; the config gains the volume fields, the model a
    ``volume_projector`` (zero output at first) and ``model.volume_encoder``. ``tokenizer`` may
    gain ``<|vision_pad|>`` (see :func:`choose_volume_token`): returns True then, and the caller
    must save it with the model. Settings left None keep the config's values.
    """
    config = model.config
    if config.volume_encoder:
        raise VolumeEncoderError("the model already has a volume encoder")
    if source is not None:
        config.volume_token_source = str(source)
    encoder = load_volume_encoder(
        encoder_folder, config.volume_token_source, config.volume_evidence_findings, config.volume_words_min_certainty
    )
    token_id, added = choose_volume_token(
        tokenizer, int(config.text_config.vocab_size), getattr(config.text_config, "pad_token_id", None)
    )
    config.volume_tokens_grid = list(tokens_grid) if tokens_grid is not None else config.volume_tokens_grid
    if experts is not None:
        config.volume_projector_experts = int(experts)
    if hidden is not None:
        config.volume_projector_hidden = int(hidden)
    if config.volume_token_source == "evidence":
        from napari_tghmoe.med3d.evidence import EVIDENCE_FEATURES

        config.volume_encoder_channels, config.volume_presence_features = 0, EVIDENCE_FEATURES
    else:
        config.volume_encoder_channels = int(encoder.config.encoder_channels)
        config.volume_presence_features = len(encoder.config.finding_kinds)
    config.volume_token_id = token_id
    config.volume_encoder = name
    try:
        config._normalise_volume_fields()
    except ValueError:
        config.volume_encoder = ""
        raise
    model._install_volume_projector(match_base_placement=True)
    model.set_volume_encoder(encoder, Path(encoder_folder))
    if isinstance(encoder, EvidenceReader) and hasattr(model, "get_input_embeddings"):
        from napari_tghmoe.med3d.evidence import evidence_feature_names

        site_names = encoder.site_head.names if encoder.site_head is not None else []
        model.volume_projector.init_verbal_path(
            evidence_feature_names(site_names), model.get_input_embeddings().weight, tokenizer
        )
    return added


def save_encoder_folder(encoder: Any, source: Path | None, target: Path) -> None:
    """The encoder's folder inside a model folder: the source folder copied when the weights are
    still those it holds (frozen), else the encoder saved anew."""
    target = Path(target)
    if source is not None and Path(source).resolve() == target.resolve():
        return
    trained = any(p.requires_grad for p in encoder.parameters())
    if target.exists():
        shutil.rmtree(target)
    if source is not None and Path(source).is_dir() and not trained:
        shutil.copytree(source, target)
    else:
        encoder.save_pretrained(str(target), safe_serialization=True)


def attach_encoder_to_folder(
    model_dir: str | Path,
    encoder_dir: str | Path,
    out: str | Path,
    *,
    tokens_grid: Sequence[int] | None = None,
    experts: int | None = None,
    hidden: int | None = None,
    overwrite: bool = False,
) -> Path:
    """``tghmoe attach-encoder``: a copy of a TGH-MoE folder with the 3D encoder and a fresh
    projector. A folder that refers to its base stays one (the base is not read); a self-contained
    folder is loaded in its stored dtype and saved again (every base tensor as it was). Written to a
    staging folder, then renamed, so ``out`` appears complete or not at all."""
    import json

    from transformers import AutoTokenizer

    from napari_tghmoe.model.convert import checked_output_folder, staged_output_folder
    from napari_tghmoe.model.loading import ModelLoadError, check_model_folder

    check = check_model_folder(model_dir)
    if not check.is_tghmoe:
        raise ModelLoadError(check.path, "a plain Qwen2.5-VL folder: run tghmoe convert first")
    if check.config.get("volume_encoder"):
        raise ModelLoadError(check.path, f"already has a volume encoder ({check.config['volume_encoder']})")
    load_volume_encoder(encoder_dir)  # a bad encoder folder fails before anything is written
    out = checked_output_folder(out, check.path, overwrite=overwrite, source_kind="model")
    tokenizer = AutoTokenizer.from_pretrained(str(check.path), local_files_only=True)
    with staged_output_folder(out, copy_small_files_from=check.path) as staging:
        settings = dict(tokens_grid=tokens_grid, experts=experts, hidden=hidden)
        if check.base is not None:
            added = _attach_by_reference(check, Path(encoder_dir), staging, out, tokenizer, settings)
        else:
            added = _attach_standalone(check, Path(encoder_dir), staging, tokenizer, settings)
        if added:
            tokenizer.save_pretrained(str(staging))
        config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
        if not config.get("volume_encoder"):  # pragma: no cover - both writers set it
            raise RuntimeError("the written config names no volume encoder")
    return out


def _attach_standalone(check: Any, encoder_dir: Path, staging: Path, tokenizer: Any, settings: dict) -> bool:
    from napari_tghmoe.model.loading import OFFLINE_LOAD_KWARGS
    from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration

    model = TGHMoEForConditionalGeneration.from_pretrained(
        str(check.path), dtype="auto", device_map={"": "cpu"}, use_safetensors=True, **OFFLINE_LOAD_KWARGS
    )
    added = attach_volume_encoder(model, encoder_dir, tokenizer, **settings)
    model.save_pretrained(str(staging))
    return added


def _attach_by_reference(
    check: Any, encoder_dir: Path, staging: Path, final: Path, tokenizer: Any, settings: dict
) -> bool:
    """Only the small files change: config, the adapter file (+ the projector), the reference."""
    from safetensors.torch import load_file, save_file

    from napari_tghmoe.model.base_ref import write_base_reference
    from napari_tghmoe.model.configuration import TGHMoEConfig

    reference = check.base
    config = TGHMoEConfig.from_pretrained(str(check.path), local_files_only=True)

    class _Holder:  # what attach_volume_encoder needs of a model, without building the base
        def __init__(self) -> None:
            self.config = config
            self.projector: VolumeTokenProjector | None = None

        def _install_volume_projector(self, match_base_placement: bool) -> None:
            self.projector = build_projector(config)

        def set_volume_encoder(self, encoder: Any, source: Path) -> None:
            self.encoder, self.source = encoder, source

    holder = _Holder()
    added = attach_volume_encoder(holder, encoder_dir, tokenizer, **settings)
    tensors = load_file(str(reference.adapter_path))
    for key, value in holder.projector.state_dict().items():
        tensors[f"volume_projector.{key}"] = value.detach().contiguous()
    save_file(tensors, str(staging / reference.adapter_file), metadata={"format": "pt", "content": "tghmoe-adapter"})
    config.save_pretrained(str(staging))
    # the digest recorded at conversion is kept: the base is not read here
    write_base_reference(
        staging, reference.base_path, list(reference.base_weight_paths), _recorded_digest(check.path),
        reference.adapter_file, final_folder=final,
    )
    save_encoder_folder(holder.encoder, holder.source, staging / config.volume_encoder)
    return added


def _recorded_digest(folder: Path) -> str | None:
    import json

    from napari_tghmoe.model.base_ref import BASE_REFERENCE_FILE

    data = json.loads((folder / BASE_REFERENCE_FILE).read_text(encoding="utf-8"))
    digest = data.get("weights_sha256")
    return str(digest) if digest else None
