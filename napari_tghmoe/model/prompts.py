"""What the model is asked: M3D-style report prompts, questions as typed, closed choices.

M3D-Cap trains report generation ("caption with findings") from a handful of paraphrased
instructions, and M3D-VQA writes closed questions as ``question Choices: A. .. B. .. C. ..
D. ..``. A model fine-tuned on that data answers best when asked the same way, so a user's
"write the report" is replaced by one of our own report instructions written in that
spirit, while real questions go to the model exactly as typed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

PromptKind = Literal["report", "question"]

#: The expert group that is always on (level 1 routes between the others).
SHARED_GROUP = "shared"
#: A model's groups when nothing else is configured: the shared one, then one per task (answer format).
DEFAULT_GROUP_NAMES = (SHARED_GROUP, "report", "vqa_closed", "vqa_open")

#: Report instructions (our wording, in the spirit of M3D-Cap's caption prompts). The first
#: is what the engine sends; training code may sample the others to avoid overfitting one.
REPORT_PROMPTS: tuple[str, ...] = (
    "Please write a report of the findings in this CT volume.",
    "Could you describe the findings you see in this CT scan?",
    "Write a radiology caption that lists the findings of this medical volume.",
    "What findings does this CT image show? Answer as a short report.",
    "Give a findings report for this three-dimensional medical scan.",
    "Summarise the abnormal and normal findings of this CT examination.",
)

# Normalised phrases that mean "give me the report" when they make up the request.
_REPORT_VERBS = ("generate", "write", "create", "produce", "draft", "give", "make", "prepare", "provide")
_REPORT_NOUNS = ("report", "radiology report", "findings report", "caption", "findings", "impression")
_REPORT_PHRASES = (
    "report",
    "findings",
    "the findings",
    "describe the findings",
    "describe findings",
    "describe this scan",
    "describe the scan",
    "describe this image",
    "describe the image",
    "describe this volume",
    "describe this ct",
    "describe the ct",
    "what are the findings",
    "what are the findings in this scan",
    "what are the findings of this scan",
    "report the findings",
    "list the findings",
    "what do you see",
    "caption this scan",
    "caption this image",
)
_FILLER = re.compile(r"\b(please|could you|can you|would you|kindly|for me|now|a|an|the|me|us)\b")
#: "... for this chest CT scan", "... of the study", "... in these images": what a report request
#: may end with (after fillers such as "the" are gone).
_SCAN_SUFFIX = re.compile(
    r"\s(?:for|of|on|in|from) (?:(?:this|that|my|these|those) )?"
    r"(?:(?:chest|abdominal|abdomen|thoracic|pelvic|head|body|ct|3d) )*"
    r"(?:scan|ct|image|images|volume|study|exam|examination|series)$"
)
_CHOICE = re.compile(r"(?:^|\s)([A-H])[.)]\s+\S")


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: what report matching compares."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return re.sub(r"\s+", " ", text).strip()


def is_report_request(question: str) -> bool:
    """True for "generate a report", "dictate the findings", "interpret this CT", ... .

    A report request asks for the read of the whole study. Two readings, both conservative:
    the old exact one (the whole request, normalised and stripped of politeness fillers, is a
    report phrase or "<verb> <report noun>" with an optional "for/of this scan"), and a broader
    one (:func:`_asks_for_the_whole_read`): the request names the read itself ("report",
    "findings", "interpretation", "impression", "write up", ...) or asks to read, interpret or
    describe the scan, and it is no question about something specific (no organ, finding, site,
    plane or phase, and no clause opening with "is there", "which", "where", ...). A question
    about something specific ("is there a report of a fracture?", "describe the liver") stays
    a question.
    """
    text = normalise(question)
    if not text or is_closed_question(question):
        return False
    if text in _REPORT_PHRASES or text in REPORT_PROMPTS_NORMALISED:
        return True
    core = _SCAN_SUFFIX.sub("", _strip_fillers(text))
    if core in _REPORT_CORES:
        return True
    for verb in _REPORT_VERBS:
        for noun in _REPORT_NOUNS:
            if core in (f"{verb} {noun}", f"{verb} {noun}s", f"{verb} radiology {noun}"):
                return True
    return _asks_for_the_whole_read(question)


#: Words that name the read of a whole study (radiology usage: a report is written, dictated,
#: read, interpreted; "a read", "a write-up", "the impression").
_WHOLE_READ = re.compile(
    r"\b(?:report|reports|findings|read|interpretation|interpret|impression|write up|writeup|"
    r"dictate|dictation|summari[sz]e|abnormalities|lesions|caption)\b"
)
#: A request to describe or go through the scan itself ("describe this CT volume", "what does this scan show").
_WHOLE_SCAN = re.compile(
    r"\b(?:describe|go through|look through|review|what does|what do)\b.*\b(?:scan|ct|image|images|volume|study|exam|examination|series)\b"
)
#: A clause that opens like a question about something specific.
_SPECIFIC_QUESTION = re.compile(
    r"(?:^|[.:;,?!]\s*)(?:is|are|was|were|does|do|did|has|have|which|where|when|why|how|who|whose|whether)\b"
)


@functools.lru_cache(maxsize=1)
def _specific_terms() -> re.Pattern:
    """Organs, finding kinds, sites and the scan's own attributes: naming one makes a request a
    question about it ("describe the liver", "where is the lung nodule")."""
    from napari_tghmoe.phantom._types import KIND_LOCATIONS

    words = {"plane", "phase", "contrast", "organ", "organs", "size", "fracture", "nodule", "nodules", "cyst", "cysts",
             "effusion", "lymph", "node", "nodes", "mass", "masses", "tumour", "tumor", "lung", "lungs", "lobe",
             "liver", "spleen", "kidney", "kidneys", "pancreas", "gallbladder", "aorta", "heart", "bone", "bones",
             "pleura", "pleural", "adrenal", "bowel", "stomach", "bladder", "spine", "rib", "ribs", "brain", "how many",
             "region", "voxel", "voxels", "box", "point", "here", "this area"}  # a question about a place (regions.py)
    for kind, locations in KIND_LOCATIONS.items():
        words.update(normalise(kind).split())
        for location in locations:
            words.update(w for w in normalise(location).split() if w not in ("the", "of", "region", "space"))
    words -= {"right", "left", "upper", "lower", "in", "a", "an", "and", "the", "of"}
    return re.compile(r"\b(?:" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b")


def _asks_for_the_whole_read(question: str) -> bool:
    lowered = re.sub(r"\s+", " ", question.lower()).strip()
    text = normalise(question)
    if _SPECIFIC_QUESTION.search(lowered) or _specific_terms().search(text):
        return False
    return bool(_WHOLE_READ.search(text) or _WHOLE_SCAN.search(text))


def _strip_fillers(text: str) -> str:
    return re.sub(r"\s+", " ", _FILLER.sub(" ", text)).strip()


REPORT_PROMPTS_NORMALISED = frozenset(normalise(p) for p in REPORT_PROMPTS)
_REPORT_CORES = frozenset(_strip_fillers(p) for p in _REPORT_PHRASES)


def is_closed_question(question: str) -> bool:
    """A multiple-choice question in M3D's ``Choices: A. .. B. ..`` form (at least two options)."""
    return "choices" in question.lower() and len(_CHOICE.findall(question)) >= 2


#: "Choices:" and everything after it, then each "X. option" in it.
_CHOICES_TAIL = re.compile(r"\bchoices\s*:\s*(.*)$", re.IGNORECASE | re.DOTALL)
_CHOICE_ITEM = re.compile(r"(?:^|\s)([A-H])[.)]\s+(.*?)(?=\s+[A-H][.)]\s+|\s*$)", re.DOTALL)


def closed_choices(question: str) -> list[tuple[str, str]]:
    """The (letter, option) pairs of an M3D-style closed question, in order; [] when it has
    none (the inverse of :func:`format_closed_question`)."""
    tail = _CHOICES_TAIL.search(question or "")
    if tail is None:
        return []
    pairs = [(m.group(1), m.group(2).strip().rstrip(".").strip()) for m in _CHOICE_ITEM.finditer(tail.group(1))]
    letters = [letter for letter, _ in pairs]
    if len(pairs) < 2 or letters != list("ABCDEFGH"[: len(pairs)]) or not all(text for _, text in pairs):
        return []
    return pairs


def format_closed_question(question: str, choices: list[str] | tuple[str, ...]) -> str:
    """``question Choices: A. x B. y ...`` exactly as M3D-VQA writes closed questions."""
    if not 2 <= len(choices) <= 8:
        raise ValueError(f"a closed question needs 2 to 8 choices, got {len(choices)}")
    letters = "ABCDEFGH"
    options = " ".join(f"{letters[i]}. {choice}" for i, choice in enumerate(choices))
    return f"{question.strip()} Choices: {options}"


@dataclass(frozen=True)
class PromptPlan:
    """What will be sent for one user request."""

    kind: PromptKind
    text: str  # the instruction placed after the volume in the user turn
    closed: bool  # a multiple-choice question (answer expected as a letter)


def plan_prompt(question: str) -> PromptPlan:
    """Report requests become the first report template; questions are kept verbatim."""
    if question is None or not question.strip():
        raise ValueError("the question is empty: type a question or ask for a report")
    if is_report_request(question):
        return PromptPlan(kind="report", text=REPORT_PROMPTS[0], closed=False)
    return PromptPlan(kind="question", text=question.strip(), closed=is_closed_question(question))


def instruction_for(prompt: str) -> str:
    """What the engine sends for a typed prompt (report requests become its report template):
    training and evaluation rewrite their prompts with it so that they see what inference sees."""
    return plan_prompt(prompt).text


# ---------------------------------------------------------------------------- tokens
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"


@dataclass
class PromptInputs:
    """Token-level inputs for one (volume, question) pair."""

    input_ids: Any  # (1, L) long
    attention_mask: Any  # (1, L) long
    mm_token_type_ids: Any  # (1, L) int: 2 on video tokens
    text_guidance_mask: Any  # (1, L) bool: the user's instruction tokens only
    prompt_text: str  # rendered prompt with one video placeholder
    history_used: int = 0  # earlier (question, answer) turns that fit and were rendered


#: Chat-template control tokens such as ``<|video_pad|>`` or ``<|im_end|>``.
_SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")
#: One earlier turn of a conversation: the instruction the model was given and its answer.
HistoryTurn = tuple[str, str]


def context_length(model_config: Any) -> int | None:
    """How many tokens the model's language part can attend to (None when the config does not say)."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for config in (text_config, model_config):
        value = getattr(config, "max_position_embeddings", None)
        if value:
            return int(value)
    return None


class PromptBuilder:
    """The one place a prompt becomes tokens, for the engine and for training alike.

    Needs only the tokenizer and the model's config (its ``video_token_id``), not the model, so
    training collation renders exactly what inference sends: a model fine-tuned on other tokens
    than it is asked with answers worse.

    A follow-up question carries earlier turns as plain user / assistant messages of the chat
    template, and the volume goes with the *current* question only: each turn may show another
    volume (the whole scan, a slab, a region), and the current instruction right after the video
    is the layout the model was trained on. Without history the prompt is the single-turn one,
    token for token.
    """

    def __init__(self, tokenizer: Any, model_config: Any):
        self.tokenizer = tokenizer
        self.video_token_id = int(model_config.video_token_id)
        self.video_token = tokenizer.convert_ids_to_tokens(self.video_token_id)
        # A model with a 3D volume encoder reads its tokens in a block of their own after the video
        # (napari_tghmoe.model.volume_tokens); 0 = none, and the prompt is what it always was.
        self.num_volume_tokens = int(getattr(model_config, "num_volume_tokens", 0) or 0)
        if self.num_volume_tokens:
            self.volume_block_ids = (
                [int(model_config.vision_start_token_id)]
                + [int(model_config.volume_token_id)] * self.num_volume_tokens
                + [int(model_config.vision_end_token_id)]
            )

    def messages(self, instruction: str, history: Sequence[HistoryTurn] = ()) -> list[dict[str, str]]:
        """The chat-template messages: earlier turns as text, then the volume and the instruction."""
        messages: list[dict[str, str]] = []
        for question, answer in history:  # as plain text: no earlier turn may smuggle in a video
            messages.append({"role": "user", "content": _SPECIAL_TOKEN.sub("", question)})
            messages.append({"role": "assistant", "content": _SPECIAL_TOKEN.sub("", answer)})
        content = f"{VISION_START_TOKEN}{self.video_token}{VISION_END_TOKEN}{instruction}"
        messages.append({"role": "user", "content": content})
        return messages

    def render(self, instruction: str, history: Sequence[HistoryTurn] = ()) -> str:
        """Chat prompt with ONE video placeholder (expanded to the real count in token space).

        The tokenizer's own chat template when it has one (a real Qwen2.5-VL folder), else the
        Qwen chat layout written out.
        """
        messages = self.messages(instruction, history)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return f"{turns}<|im_start|>assistant\n"

    def build_inputs(
        self,
        instruction: str,
        num_video_tokens: int,
        history: Sequence[HistoryTurn] = (),
        max_length: int | None = None,
        evidence_words: str = "",
    ) -> PromptInputs:
        """Tokenise the prompt, expand the video placeholder, mark the instruction tokens.

        ``evidence_words``: the 3D encoder's evidence line (``volume_tokens.EvidenceReader.words``),
        placed right after the volume block (never instruction tokens).

        ``history``: earlier (instruction, answer) turns, oldest first. With ``max_length`` (the
        tokens the prompt may take, video included) the oldest turns are dropped until it fits;
        ``PromptInputs.history_used`` says how many were kept.
        """
        history = list(history)
        while True:
            inputs = self._build(instruction, num_video_tokens, history, evidence_words)
            if not history or max_length is None or inputs.input_ids.shape[1] <= max_length:
                return inputs
            history = history[1:]  # the oldest turn goes first

    def _build(
        self, instruction: str, num_video_tokens: int, history: list[HistoryTurn], evidence_words: str = ""
    ) -> PromptInputs:
        import torch

        prompt = self.render(instruction, history)
        start = prompt.rfind(instruction)  # the current instruction is the last text before the reply
        end = start + len(instruction)
        encoded = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = []
        guidance: list[bool] = []
        for token_id, (s, e) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            if token_id == self.video_token_id:
                ids.extend([token_id] * num_video_tokens)
                guidance.extend([False] * num_video_tokens)
            else:
                ids.append(token_id)
                guidance.append(start >= 0 and e > s and s < end and e > start)
        if ids.count(self.video_token_id) != num_video_tokens:
            raise RuntimeError("the tokenizer split the video placeholder: tokenizer and model do not match")
        if self.num_volume_tokens:
            words = self.tokenizer(evidence_words, add_special_tokens=False)["input_ids"] if evidence_words else []
            ids, guidance = self._with_volume_block(ids, guidance, words)
        input_ids = torch.tensor([ids], dtype=torch.long)
        return PromptInputs(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            mm_token_type_ids=(input_ids == self.video_token_id).to(torch.int32) * 2,
            text_guidance_mask=torch.tensor([guidance], dtype=torch.bool),
            prompt_text=prompt,
            history_used=len(history),
        )

    def _with_volume_block(
        self, ids: list[int], guidance: list[bool], words: list[int] = ()
    ) -> tuple[list[int], list[bool]]:
        """``<|vision_start|>`` + N volume placeholders + ``<|vision_end|>`` (+ the evidence words)
        right after the video's ``<|vision_end|>`` (never instruction tokens)."""
        after_video = len(ids) - ids[::-1].index(self.video_token_id)  # index of the video's <|vision_end|>
        if after_video >= len(ids) or ids[after_video] != self.volume_block_ids[-1]:
            raise RuntimeError("the video block does not end with <|vision_end|>: cannot place the volume tokens")
        at = after_video + 1
        block = self.volume_block_ids + list(words)
        return ids[:at] + block + ids[at:], guidance[:at] + [False] * len(block) + guidance[at:]


# ---------------------------------------------------------------------------- topics
#: What a prompt is about, by the words of its question (the choices are not read: they list
#: distractors from other organs). The level-1 routers see the same words, so this is the content
#: a content-aware router could pick up, as opposed to the answer format (report / closed / open).
TOPIC_WORDS: dict[str, tuple[str, ...]] = {
    "chest": ("lung", "lungs", "pleural", "pleura", "nodule", "effusion", "lobe", "mediastinal", "hilar", "chest"),
    "abdomen": ("liver", "hepatic", "kidney", "kidneys", "renal", "cyst", "spleen", "splenic", "abdominal", "abdomen"),
    "acquisition": ("plane", "phase", "contrast", "arterial", "venous", "enhancement"),
}
#: Topic of report requests, and of questions that name none of the words above.
REPORT_TOPIC = "report"
GENERAL_TOPIC = "general"
TOPICS: tuple[str, ...] = (*TOPIC_WORDS, GENERAL_TOPIC, REPORT_TOPIC)


def prompt_topic(instruction: str) -> str:
    """``"chest"``, ``"abdomen"``, ``"acquisition"``, ``"general"`` or ``"report"``.

    A question naming words of two topics (e.g. "enlarged lymph node", which occurs in both
    regions, names none; "liver and lung" names two) is ``"general"``.
    """
    if is_report_request(instruction) or normalise(instruction) in REPORT_PROMPTS_NORMALISED:
        return REPORT_TOPIC
    stem = re.split(r"\bChoices\s*:", instruction, maxsplit=1)[0]
    words = set(re.findall(r"[a-z]+", stem.lower()))
    found = [topic for topic, vocabulary in TOPIC_WORDS.items() if words & set(vocabulary)]
    return found[0] if len(found) == 1 else GENERAL_TOPIC


def routing_label(task: str, instruction: str, group_names: list[str] | tuple[str, ...]) -> int:
    """Index into ``group_names`` of the group that the task-supervision loss teaches level 1 to
    pick for this sample, or -100 (no supervision).

    With the default groups (report, vqa_closed, vqa_open) that is the sample's task (its answer
    format); a model whose groups are topics (e.g. report, chest, abdomen, acquisition, general)
    is taught the topic of the question instead (:func:`prompt_topic`), i.e. to route by content.
    """
    if task in group_names:
        return list(group_names).index(task)
    topic = REPORT_TOPIC if task == "report" else prompt_topic(instruction)
    return list(group_names).index(topic) if topic in group_names else -100
