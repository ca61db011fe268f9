"""Prompt templates: the exact strings the probing reference fed its model, plus user templates.

The reference (Vector Institute, `compute_activations.ipynb`; spec `probing.md` sections 1.4-1.5)
counts "words" as pieces of `text.split(" ")` on single spaces and keeps the LAST pieces when it
truncates. It then truncates EVERY model input to its last 256 pieces, prompted ones included,
so its 5-shot prompts usually lose the instruction and the first demonstrations. `vector-5shot`
reproduces that; `vector-5shot-untruncated` is the same prompt without the outer cut.

Built-in templates (`TEMPLATES`):
  raw                        the text's last 256 words, nothing added
  vector-5shot               instruction + 5 demonstrations (64 words each) + query (128 words)
                             + " The sentiment is", then cut to the last 256 words (faithful)
  vector-5shot-untruncated   the same prompt without the outer 256-word cut

A user template is a Python format string with the field `{text}` (the whole text) and
optionally `{demonstrations}` (the demonstration block, as the vector templates build it).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jaxprobe.errors import UserError

INSTRUCTION = "Classify the sentiment of the text."
LABEL_NAMES = ("negative", "positive")  # label 0, label 1 (the reference's label_int_to_str)
RAW_WORDS = 256           # the reference's cap on every model input
DEMONSTRATION_WORDS = 64  # each demonstration keeps its last 64 words
QUERY_WORDS = 128         # the query text keeps its last 128 words
N_SHOTS = 5


def truncate_words(text: str, n_words: int) -> str:
    """Keep the last `n_words` pieces of `text.split(" ")` (the reference's `truncate_input_text`).

    Splitting on single spaces (not `str.split()`) is deliberate: runs of spaces and newlines
    count the way the reference counted them.
    """
    pieces = text.split(" ")
    if len(pieces) > n_words:
        return " ".join(pieces[-n_words:])
    return text


def demonstration_block(texts: Sequence[str], labels: Sequence[int], *,
                        instruction: str = INSTRUCTION,
                        label_names: Sequence[str] = LABEL_NAMES,
                        words_per_demonstration: int = DEMONSTRATION_WORDS) -> str:
    """The reference's `create_demonstrations`: instruction, then per demonstration
    `\\nText: <last 64 words>\\nSentiment: <label name>`, then a final newline."""
    block = instruction
    for text, label in zip(texts, labels, strict=True):
        block = (f"{block}\nText: {truncate_words(text, words_per_demonstration)}"
                 f"\nSentiment: {label_names[int(label)]}")
    return f"{block}\n"


def raw_prompt(text: str, demonstrations: str | None = None) -> str:
    """`raw`: the text's last 256 words, as the reference sent its "without prompts" inputs."""
    return truncate_words(text, RAW_WORDS)


def vector_5shot_untruncated_prompt(text: str, demonstrations: str | None) -> str:
    """`vector-5shot-untruncated`: demonstrations + `Text: <last 128 words> The sentiment is`.

    The query ends with " The sentiment is" while the demonstrations say "\\nSentiment: ...":
    the mismatch is verbatim in the reference.
    """
    if demonstrations is None:
        raise ValueError("vector-5shot templates need a demonstration block")
    return f"{demonstrations}Text: {truncate_words(text, QUERY_WORDS)} The sentiment is"


def vector_5shot_prompt(text: str, demonstrations: str | None) -> str:
    """`vector-5shot` (faithful): the untruncated prompt cut to its last 256 words, as the
    reference's `generate_dataset_activations` did to every input."""
    return truncate_words(vector_5shot_untruncated_prompt(text, demonstrations), RAW_WORDS)


@dataclass(frozen=True)
class Template:
    """A named way to turn one text (and maybe a demonstration block) into one prompt."""

    name: str
    description: str
    render: Callable[[str, str | None], str]
    uses_demonstrations: bool
    n_shots: int | None = None  # demonstrations it requires; None = as many as given

    def prompts(self, texts: Sequence[str], demonstrations: str | None = None) -> list[str]:
        return [self.render(text, demonstrations) for text in texts]


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("raw", "the text's last 256 space-separated words, nothing added", raw_prompt, False),
    Template("vector-5shot", "instruction + 5 demonstrations (64 words) + query (128 words) + "
             "' The sentiment is', cut to the last 256 words (the reference, faithfully)",
             vector_5shot_prompt, True, N_SHOTS),
    Template("vector-5shot-untruncated", "vector-5shot without the outer 256-word cut",
             vector_5shot_untruncated_prompt, True, N_SHOTS),
)}

_FORMAT_FIELDS = ("text", "demonstrations")


def format_template(template: str) -> Template:
    """A user template from a format string with `{text}` and optionally `{demonstrations}`.

    The text goes in whole (no word cut); use `extract --max-length` to bound token counts.
    Literal braces are written `{{` and `}}`.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UserError(f"--template {template!r} is not a valid format string: {e}") from None
    fields = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
    for name, spec, conv in fields:
        if name not in _FORMAT_FIELDS or spec or conv:
            raise UserError(f"--template {template!r}: unsupported field {{{name}}}; use {{text}} "
                            "and optionally {demonstrations} (write {{ and }} for literal braces)")
    names = {name for name, _, _ in fields}
    if "text" not in names:
        raise UserError(f"--template {template!r} has no {{text}} field")
    uses_demonstrations = "demonstrations" in names

    def render(text: str, demonstrations: str | None) -> str:
        return template.format(text=text, demonstrations=demonstrations or "")

    return Template(template, "user format string", render, uses_demonstrations)


def get_template(spec: str) -> Template:
    """A built-in template by name, or a user template if `spec` contains a `{` field."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{" in spec:
        return format_template(spec)
    raise UserError(f"--template {spec!r} is neither a built-in template "
                    f"({', '.join(TEMPLATES)}) nor a format string with {{text}}")


def parse_row_slice(spec: str, flag: str = "--demonstrations-from") -> range:
    """`START:STOP` (positions in the shuffled demonstration split) as a range."""
    try:
        start_s, stop_s = spec.split(":")
        start, stop = int(start_s), int(stop_s)
    except ValueError:
        raise UserError(f"{flag} {spec!r} must look like START:STOP, e.g. 100:105") from None
    if not 0 <= start < stop:
        raise UserError(f"{flag} {spec!r} must satisfy 0 <= START < STOP")
    return range(start, stop)
