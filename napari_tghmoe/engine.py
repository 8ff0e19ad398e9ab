"""Load a model once; answer questions about a CT volume as a stream of text, then an Answer.

``InferenceEngine.answer`` is a plain generator so the napari chat dock can drive it from a
``thread_worker`` (each yielded chunk becomes a signal) and the CLI from a ``for`` loop.
Generation runs in a background thread feeding a transformers ``TextIteratorStreamer``;
a ``StoppingCriteria`` polls ``stop_event`` after every token, so a stop request ends the
generation within one token. No Qt here.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_tghmoe.model.prompts import (
    SHARED_GROUP,
    HistoryTurn,
    PromptBuilder,
    PromptInputs,
    closed_choices,
    context_length,
)

__all__ = ["Answer", "InferenceEngine", "PromptInputs"]

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    """The model's answer and everything needed to show, trust and export it."""

    text: str
    task_probs: dict[str, float]  # task group -> probability, from the text router
    routing: Any  # napari_tghmoe.model.RoutingTrace or None
    timings: dict[str, float]  # preprocess_s, time_to_first_token_s, generate_s, tokens_per_s, n_tokens
    device: str
    peak_memory: int  # bytes: CUDA max allocated, or the process's peak RSS on the CPU
    question: str = ""
    prompt_kind: str = "question"  # "report" | "question"
    prompt: str = ""  # the instruction actually sent after the volume
    model_name: str = ""
    weights_sha256: str | None = None
    precision: str = ""
    stopped: bool = False  # stop_event ended the generation early
    tokens_after_stop: int = 0  # tokens the streamer received after stop_event was set
    warnings: list[str] = field(default_factory=list)
    history_used: int = 0  # earlier turns of the conversation that went into the prompt
    # A multiple-choice question is answered with the option the model finds most likely
    # (:meth:`InferenceEngine.rank_choices`); its own free words stay here, and each option's
    # mean log-probability per token (letter -> score) beside them.
    generated_text: str = ""
    choice_scores: dict[str, float] = field(default_factory=dict)


def _token_streamer(tokenizer: Any, stop_event: threading.Event):
    """A TextIteratorStreamer that also counts tokens, times the first one and flushes per token."""
    from transformers import TextIteratorStreamer

    class _Streamer(TextIteratorStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.n_tokens = 0
            self.tokens_after_stop = 0
            self.first_token_time: float | None = None

        def put(self, value: Any) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.n_tokens += int(value.numel())
                if self.first_token_time is None:
                    self.first_token_time = time.perf_counter()
                if stop_event.is_set():
                    self.tokens_after_stop += int(value.numel())
            super().put(value)
            # TextStreamer holds text back until a space; a chat wants every token at once.
            # Keep back only an incomplete UTF-8 character (decoded as U+FFFD).
            if self.token_cache:
                text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
                pending = text[self.print_len :]
                if pending and not pending.endswith("\ufffd"):
                    self.print_len += len(pending)
                    self.on_finalized_text(pending)

    return _Streamer()


def _stop_criteria(*events: threading.Event):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _EventStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # noqa: ANN001 - transformers API
            import torch

            stop = any(event.is_set() for event in events)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_EventStop()])


class InferenceEngine:
    """A loaded model + tokenizer answering questions about CT volumes (thread-safe, one at a time)."""

    def __init__(self, model: Any, tokenizer: Any, info: Any = None, rank_choices: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        #: answer multiple-choice questions with the most likely option (see :meth:`rank_choices`)
        self.ranks_choices = rank_choices
        self._lock = threading.Lock()
        self.prompts = PromptBuilder(tokenizer, model.config)
        forward_params = inspect.signature(model.forward).parameters
        self.accepts_text_guidance = "text_guidance_mask" in forward_params

    @classmethod
    def from_pretrained(cls, path: str | Path, **load_options: Any) -> InferenceEngine:
        """Load once (see :func:`napari_tghmoe.model.load_model` for the options)."""
        from napari_tghmoe.model.loading import load_model

        loaded = load_model(path, **load_options)
        return cls(loaded.model, loaded.tokenizer, loaded.info)

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> str:
        return str(getattr(self.model, "device", "cpu"))

    @property
    def model_name(self) -> str:
        if self.info is not None:
            return self.info.model_name
        return str(getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__)

    @property
    def precision(self) -> str:
        if self.info is not None:
            return self.info.precision
        return str(self.model.dtype).replace("torch.", "")

    # ------------------------------------------------------------------ prompts

    def render_prompt(self, instruction: str) -> str:
        """Chat prompt with ONE video placeholder (see :meth:`PromptBuilder.render`)."""
        return self.prompts.render(instruction)

    def build_inputs(
        self,
        instruction: str,
        num_video_tokens: int,
        history: Any = (),
        max_length: int | None = None,
        evidence_words: str = "",
    ) -> PromptInputs:
        """Token inputs of one prompt (see :meth:`PromptBuilder.build_inputs`)."""
        if not history:
            return self.prompts.build_inputs(instruction, num_video_tokens, evidence_words=evidence_words)
        return self.prompts.build_inputs(
            instruction, num_video_tokens, history=history, max_length=max_length, evidence_words=evidence_words
        )

    # ------------------------------------------------------------------ answering

    def prepare(self, volume: Any, spacing: Any = None):
        """``VolumeInputs`` for a CTVolume / array (+ spacing); VolumeInputs pass through.

        A model with a 3D volume encoder also gets the encoder's tokens of the CT, kept on the
        inputs as ``volume_features`` (the encoder reads the CT at its own grid, not the video).
        """
        from napari_tghmoe.model.preprocess import VolumeInputs, prepare_volume

        if isinstance(volume, VolumeInputs):
            return volume
        inputs = prepare_volume(volume, spacing, self.model.config)
        if self.has_volume_encoder:
            inputs.volume_features = self.model.volume_features(volume, spacing)
            inputs.evidence_words = self.model.volume_words(volume, spacing)
        return inputs

    @property
    def has_volume_encoder(self) -> bool:
        """The model reads the CT with a 3D encoder beside its video tokens."""
        return bool(getattr(self.model.config, "num_volume_tokens", 0))

    def volume_kwargs(self, inputs: Any, device: Any) -> dict[str, Any]:
        """``volume_features`` for ``generate`` ({} for a model without a volume encoder)."""
        if not self.has_volume_encoder:
            return {}
        features = getattr(inputs, "volume_features", None)
        if features is None:
            raise ValueError(
                "this model reads the CT with its 3D encoder: pass the volume, or inputs made by engine.prepare"
            )
        return {"volume_features": features[None].to(device)}

    def intensity_warning(self, inputs: Any) -> str | None:
        """Warn (``IntensityMismatchWarning``) when the volume's intensities are not the kind the
        model was trained on (HU vs [0, 1] display intensities); returns the message, or None.

        Raised inside :meth:`answer`, the warning reaches the chat dock's worker, which napari
        relays as a notification; the message also goes to ``Answer.warnings`` (and the report).
        """
        from napari_tghmoe.model.preprocess import INTENSITY_HU, IntensityMismatchWarning

        intensity = getattr(inputs, "intensity", None)
        if intensity is None or not inputs.intensity_mismatch:
            return None
        names = {INTENSITY_HU: "CT in Hounsfield units", "unit": "[0, 1] display intensities"}
        model_kind = inputs.settings.input_intensity
        how = (
            "mapped back to pseudo-HU on the soft-tissue window"
            if model_kind == INTENSITY_HU
            else "windowed (soft tissue) and min-max normalised the M3D way"
        )
        why = f" ({intensity.reason})" if intensity.guessed else ""
        message = (
            f"the volume holds {names.get(intensity.kind, intensity.kind)}{why}, but the model was trained on "
            f"{names.get(model_kind, model_kind)}: the input was {how}, so the answer may be unreliable"
        )
        warnings.warn(message, IntensityMismatchWarning, stacklevel=3)
        return message

    def answer(
        self,
        volume: Any,
        question: str,
        max_new_tokens: int = 256,
        stop_event: threading.Event | None = None,
        trace: bool = True,
        *,
        spacing: Any = None,
        generation_options: dict[str, Any] | None = None,
        history: list[HistoryTurn] | tuple[HistoryTurn, ...] = (),
    ) -> Iterator[str | Answer]:
        """Yield the answer's text chunks as they are generated, then the :class:`Answer`.

        ``volume``: a ``CTVolume``, a (z, y, x) HU array with ``spacing``, or ``VolumeInputs``.
        ``stop_event``: set it (from any thread) to stop within one token; the Answer then
        has ``stopped=True``. Closing the generator early also stops the generation.
        ``generation_options`` go to ``model.generate`` (greedy decoding by default).
        ``history``: earlier (instruction, answer) turns of the conversation, oldest first; the
        oldest are dropped when the prompt and ``max_new_tokens`` would not fit the model's context.
        """
        import torch

        from napari_tghmoe.model.prompts import plan_prompt

        plan = plan_prompt(question)  # raises ValueError on an empty question, before any work
        stop_event = stop_event or threading.Event()
        abandoned = threading.Event()  # set when the consumer closes the generator early
        with self._lock:
            t_start = time.perf_counter()
            inputs = self.prepare(volume, spacing)
            intensity_note = self.intensity_warning(inputs)
            window = context_length(self.model.config)
            budget = window - max_new_tokens if window and history else None
            prompt = self.build_inputs(
                plan.text, inputs.num_video_tokens, history, budget, getattr(inputs, "evidence_words", "")
            )
            preprocess_s = time.perf_counter() - t_start

            device = self.model.device
            on_cuda = device.type == "cuda"
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            model_kwargs: dict[str, Any] = {
                "input_ids": prompt.input_ids.to(device),
                "attention_mask": prompt.attention_mask.to(device),
                "mm_token_type_ids": prompt.mm_token_type_ids.to(device),
                **inputs.model_kwargs(device=device),
                **self.volume_kwargs(inputs, device),
            }
            if self.accepts_text_guidance:
                model_kwargs["text_guidance_mask"] = prompt.text_guidance_mask.to(device)
            streamer = _token_streamer(self.tokenizer, stop_event)
            generate_kwargs = {
                **model_kwargs,
                "max_new_tokens": max_new_tokens,
                "do_sample": False,
                "streamer": streamer,
                "stopping_criteria": _stop_criteria(stop_event, abandoned),
                "pad_token_id": self.tokenizer.pad_token_id,
                **(generation_options or {}),
            }
            copy_bias = self._copy_bias(getattr(inputs, "evidence_words", ""), prompt.input_ids.shape[1])
            if copy_bias is not None:
                from transformers import LogitsProcessorList

                generate_kwargs["logits_processor"] = LogitsProcessorList(
                    [copy_bias, *generate_kwargs.get("logits_processor", [])]
                )
            outcome: dict[str, Any] = {}
            recording = trace and hasattr(self.model, "record_routing")

            def run() -> None:
                try:
                    with torch.inference_mode():
                        if recording:
                            with self.model.record_routing() as recorder:
                                outcome["sequences"] = self.model.generate(**generate_kwargs)
                            outcome["trace"] = recorder.trace
                        else:
                            outcome["sequences"] = self.model.generate(**generate_kwargs)
                except BaseException as err:  # noqa: BLE001 - handed to the consuming thread
                    outcome["error"] = err
                    streamer.end()  # unblock the consumer

            t_generate = time.perf_counter()
            worker = threading.Thread(target=run, name="tghmoe-generate", daemon=True)
            worker.start()
            pieces: list[str] = []
            finished = False
            try:
                for chunk in streamer:
                    if chunk:
                        pieces.append(chunk)
                        yield chunk
                finished = True
            finally:
                if not finished:  # the consumer closed the generator: stop at the next token
                    abandoned.set()
                worker.join()
            t_end = time.perf_counter()
            if "error" in outcome:
                raise outcome["error"]

            routing = outcome.get("trace")
            task_probs = self._task_probs(routing, model_kwargs)
            n_tokens = streamer.n_tokens
            first = streamer.first_token_time
            decode_s = (t_end - first) if first is not None else 0.0
            timings = {
                "preprocess_s": preprocess_s,
                "time_to_first_token_s": (first - t_generate) if first is not None else float("nan"),
                "generate_s": t_end - t_generate,
                "tokens_per_s": (n_tokens - 1) / decode_s if n_tokens > 1 and decode_s > 0 else 0.0,
                "n_tokens": float(n_tokens),
            }
            generated_text = "".join(pieces).strip()
            answer_text, choice_scores = generated_text, {}
            choices = closed_choices(plan.text) if plan.closed and self.ranks_choices else []
            if choices and not stop_event.is_set():
                choice_scores = self.rank_choices(model_kwargs, choices, copy_bias=copy_bias)
                best = max(choice_scores, key=choice_scores.__getitem__)
                answer_text = f"{best}. {dict(choices)[best]}"
            yield Answer(
                text=answer_text,
                generated_text=generated_text,
                choice_scores=choice_scores,
                task_probs=task_probs,
                routing=routing,
                timings=timings,
                device=str(device),
                peak_memory=_peak_memory(device),
                question=question,
                prompt_kind=plan.kind,
                prompt=plan.text,
                model_name=self.model_name,
                weights_sha256=getattr(self.info, "weights_sha256", None),
                precision=self.precision,
                stopped=stop_event.is_set(),
                tokens_after_stop=streamer.tokens_after_stop,
                warnings=list(getattr(self.info, "warnings", []) or []) + ([intensity_note] if intensity_note else []),
                history_used=prompt.history_used,
            )

    def _copy_bias(self, evidence_words: str, prompt_length: int) -> Any:
        """The model's evidence copy bias for this prompt (``napari_tghmoe.model.copying``), or None."""
        bias = float(getattr(self.model.config, "volume_words_copy_bias", 0.0) or 0.0)
        if bias <= 0.0 or not evidence_words:
            return None
        from napari_tghmoe.model.copying import EvidenceCopyBias

        ids = self.tokenizer(evidence_words, add_special_tokens=False)["input_ids"]
        return EvidenceCopyBias(ids, bias, prompt_length)

    def rank_choices(
        self, model_kwargs: dict[str, Any], choices: list[tuple[str, str]], copy_bias: Any = None
    ) -> dict[str, float]:
        """Each option's mean log-probability per token, as the answer "X. option" after the prompt.

        Why: a small model can name the right option and still write the wrong letter before it
        (the demo model: right option named 0.69, right letter 0.44, docs/results.md, issue 15).
        Scoring the options' words, each after its own letter, is how multiple-choice benchmarks
        are read out of language models (the likelihood readout of lm-evaluation-harness); the
        mean per token keeps long options ("left kidney, upper pole") from losing to short ones.
        The prompt (vision tower included) is read once; each option then continues from its
        key/value cache, as generation does (:meth:`_option_log_probs`). ``copy_bias``: the
        model's evidence copy bias (:meth:`_copy_bias`), applied as decoding would apply it, so an
        option is scored as the engine would write it.
        """
        import torch

        scored: list[tuple[str, list[int], int]] = []
        for letter, option in choices:
            head = self.tokenizer.encode(f"{letter}.", add_special_tokens=False)
            whole = self.tokenizer.encode(f"{letter}. {option}", add_special_tokens=False)
            scored_from = len(head) if whole[: len(head)] == head and len(whole) > len(head) else 0
            scored.append((letter, whole, scored_from))
        with torch.inference_mode():
            per_option = self._option_log_probs(model_kwargs, [tokens for _, tokens, _ in scored], copy_bias=copy_bias)
        return {letter: float(lp[start:].mean()) for (letter, _, start), lp in zip(scored, per_option)}

    def _option_log_probs(
        self, model_kwargs: dict[str, Any], options: list[list[int]], cached: bool = True, copy_bias: Any = None
    ) -> list[Any]:
        """Log-probabilities of each option's tokens after the prompt of ``model_kwargs``.

        ``cached``: one forward of the prompt, then each option from a copy-free key/value cache
        (cropped back to the prompt after each); else one full forward per option (the reference
        the cached path is tested against, and the fallback for a model without a croppable cache).
        """
        import torch

        prompt_ids = model_kwargs["input_ids"]
        device = prompt_ids.device
        length = prompt_ids.shape[1]

        def picked(logits: Any, tokens: list[int]) -> Any:
            logits = logits.float()
            if copy_bias is not None:
                logits = copy_bias.along(tokens, logits)
            log_probs = logits.log_softmax(-1)
            return log_probs[torch.arange(len(tokens)), torch.tensor(tokens, device=log_probs.device)]

        if cached:
            prefill = self.model(**model_kwargs, use_cache=True)
            from napari_tghmoe.model.modeling import CACHE_FIELD

            cache = getattr(prefill, CACHE_FIELD, None)  # the installed version's name: no deprecation notice
            # text after the prompt sits at its index plus the prompt's 3D-rope offset (Qwen2.5-VL)
            deltas = getattr(getattr(self.model, "model", None), "rope_deltas", None)
            if cache is not None and callable(getattr(cache, "crop", None)) and deltas is not None:
                first = prefill.logits[0, -1:]
                results = []
                for tokens in options:
                    added = torch.tensor([tokens], dtype=prompt_ids.dtype, device=device)
                    mask = torch.cat([model_kwargs["attention_mask"], torch.ones_like(added)], dim=1)
                    where = torch.arange(length, length + len(tokens), device=device)
                    step = self.model(
                        input_ids=added,
                        attention_mask=mask,
                        cache=cache,
                        position_ids=(where + deltas.to(device)[0]).view(1, 1, -1).expand(3, 1, -1),
                        cache_position=where,
                        use_cache=True,
                    )
                    results.append(picked(torch.cat([first, step.logits[0, :-1]]), tokens))
                    cache.crop(-len(tokens))  # back to the prompt alone
                return results
        results = []
        for tokens in options:
            added = torch.tensor([tokens], dtype=prompt_ids.dtype, device=device)
            kwargs = dict(model_kwargs)
            kwargs["input_ids"] = torch.cat([prompt_ids, added], dim=1)
            kwargs["attention_mask"] = torch.cat([model_kwargs["attention_mask"], torch.ones_like(added)], dim=1)
            kwargs["mm_token_type_ids"] = torch.cat([model_kwargs["mm_token_type_ids"], torch.zeros_like(added)], dim=1)
            if "text_guidance_mask" in model_kwargs:
                mask = model_kwargs["text_guidance_mask"]
                kwargs["text_guidance_mask"] = torch.cat([mask, torch.zeros(added.shape, dtype=mask.dtype, device=device)], dim=1)
            logits = self.model(**kwargs).logits[0]
            results.append(picked(logits[length - 1 : length - 1 + len(tokens)], tokens))
        return results

    def ask(self, volume: Any, question: str, **kwargs: Any) -> Answer:
        """Run :meth:`answer` to the end and return only the :class:`Answer`."""
        result = None
        for item in self.answer(volume, question, **kwargs):
            result = item
        assert isinstance(result, Answer)
        return result

    # ------------------------------------------------------------------ shared segmentations

    def _evidence_reader(self) -> Any:
        from napari_tghmoe.model.volume_tokens import EvidenceReader

        encoder = getattr(self.model, "volume_encoder", None)
        return encoder if isinstance(encoder, EvidenceReader) else None

    def remember_segmentation(self, volume: Any, result: Any, folder: str | Path | None) -> bool:
        """Offer a segmentation of ``volume`` made with the cascade in ``folder`` (None: not known)
        as its evidence, so the next answer about it does not segment again. True when the model's
        evidence reader took it (only from its own cascade: ``EvidenceReader.adopt``)."""
        reader = self._evidence_reader()
        return reader is not None and reader.adopt(volume, result, folder)

    def segmentation_of(self, volume: Any, folder: str | Path | None = None) -> tuple[Any, Path] | None:
        """(``SegmentationResult``, its cascade folder) the evidence reader made of ``volume`` for the
        last answer, when that cascade is the one in ``folder`` (None: the bundled demo cascade,
        ``segment_volume``'s default), so the chat places stated findings with it; else None."""
        reader = self._evidence_reader()
        result = reader.segmentation(volume) if reader is not None else None
        if result is None or not reader.same_cascade(folder):
            return None
        return result, reader.folder

    def _task_probs(self, routing: Any, model_kwargs: dict[str, Any]) -> dict[str, float]:
        """Task-group probabilities from the trace, else from the level-1 routers alone (cheap)."""
        if routing is not None and hasattr(routing, "task_probs"):
            return {str(k): float(v) for k, v in routing.task_probs().items()}
        return self.router_task_probs(model_kwargs)

    def router_task_probs(self, model_kwargs: dict[str, Any]) -> dict[str, float]:
        """Text -> task-group probabilities without running the vision tower or the LLM.

        The level-1 routers of the MoE blocks that carry task groups, averaged by the rule of
        :func:`napari_tghmoe.model.moe.mean_task_group_probs` (as ``RoutingTrace.task_probs``);
        {} for a model without experts.
        """
        text_features = getattr(self.model, "text_features", None)
        moe_layers = getattr(self.model, "moe_layers", None)
        if not callable(text_features) or not callable(moe_layers):
            return {}
        import torch

        from napari_tghmoe.model.moe import mean_task_group_probs

        group_names = list(self.model.config.group_names)
        with torch.inference_mode():
            text = text_features(
                input_ids=model_kwargs["input_ids"],
                attention_mask=model_kwargs.get("attention_mask"),
                text_guidance_mask=model_kwargs.get("text_guidance_mask"),
            )
            blocks = []
            for layer in moe_layers().values():
                if layer.task_router is None:
                    continue
                weight = layer.task_router.weight
                probs = layer.task_router(text.to(device=weight.device, dtype=weight.dtype)).float().softmax(-1)
                blocks.append((probs.cpu(), layer.task_group_names))
            mean = mean_task_group_probs(blocks, group_names)
        if mean is None:
            return {}
        return {name: float(mean[0, group_names.index(name)]) for name in group_names if name != SHARED_GROUP}


def _peak_memory(device: Any) -> int:
    """Peak bytes: CUDA max allocated for a GPU run, else the process's peak resident set."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return 0
