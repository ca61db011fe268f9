"""Every prompt jaxprobe builds: the probing templates (the Vector Institute notebooks) and the
active-testing prompts, in-context examples and label tokens (the paper's).

## Probing templates

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

## Active-testing prompts

The reference's prompt (`dataset_class.py:98-99`, `evaluation.py:132-141`), kept byte for byte:

    zero-shot:  "{instruction}Sentence: '{s}' \\n{Answer}:"
    N-shot:     instruction + N x "Sentence: '{s_k}' \\n{Answer}: {word_k}\\n\\n" + the zero-shot query

Note the space before the newline and the single quotes. Sentences are `.strip()`ped first (SST-2
rows end with a space). The model's prediction is read from the logits of the token that would
follow the prompt, restricted to one token per label word: the first token of " {word}" when it is
appended to a real prompt (spec 2.3; on SmolLM2 " positive" = 2731, " negative" = 3524).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from jaxprobe.errors import UserError

# ---------------------------------------------------------------- probing templates

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


def variant_name(template: str) -> str:
    """A template's name in results: a built-in's own name, else `custom:` and the format string."""
    return template if template in TEMPLATES else "custom:" + template


# ---------------------------------------------------------------- active-testing prompts

SST2_INSTRUCTION = ('Classify the sentiment of the following sentence as "positive" or "negative". '
                    'Respond with "positive" or "negative".\n')


SST2_LABEL_WORDS = ("negative", "positive")  # label id 0, 1


ICL_SELECTIONS = ("class-proportional", "random")


MULTI_TOKEN_POLICIES = ("error", "first")


def default_instruction(label_words: Sequence[str]) -> str:
    """The SST-2 instruction for SST-2's words; otherwise the same sentence shape over the words."""
    if tuple(label_words) == SST2_LABEL_WORDS:
        return SST2_INSTRUCTION
    quoted = [f'"{w}"' for w in label_words]
    choices = " or ".join([", ".join(quoted[:-1]), quoted[-1]]) if len(quoted) > 1 else quoted[0]
    return f"Classify the following sentence as {choices}. Respond with {choices}.\n"


SENTENCE_QUERY = "Sentence: '{text}' \n{answer_word}:"  # the reference's query (all but MMLU)


CHOICE_LINE = "{letter}. {choice}\n"  # one line per option of a multiple-choice question


@dataclass(frozen=True)
class PromptFormat:
    """How one row becomes a query: `query` has the fields {text} (stripped), {answer_word} and
    {choices} (the options, one `choice_line` each, lettered by `letters`, the label words).
    The reference's MMLU query (its fork's `dataset_class.py`) is
    "Question: {text} \\n{choices}{answer_word}:" with lines "A. ...\\n"."""

    query: str = SENTENCE_QUERY
    choice_line: str = CHOICE_LINE
    letters: tuple[str, ...] = ()

    def render(self, text: str, answer_word: str, choices: Sequence[str] | None = None) -> str:
        listed = ""
        if choices is not None:
            if len(choices) > len(self.letters):
                raise UserError(f"a question has {len(choices)} choices but there are only "
                                f"{len(self.letters)} label words {list(self.letters)}")
            listed = "".join(self.choice_line.format(letter=letter, choice=c)
                             for letter, c in zip(self.letters, choices))
        return self.query.format(text=text.strip(), answer_word=answer_word, choices=listed)


def check_query_format(query: str, where: str = "query_format") -> None:
    """Refuse a query format with fields other than {text}, {answer_word}, {choices}."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(query) if name is not None}
    except ValueError as e:
        raise UserError(f"{where} {query!r} is not a valid format string: {e}") from None
    unknown = fields - {"text", "answer_word", "choices"}
    if unknown or "text" not in fields:
        raise UserError(f"{where} {query!r} must use {{text}} and only {{text}}, {{answer_word}} and "
                        f"{{choices}} (found {sorted(fields)})")


def query_block(sentence: str, answer_word: str, fmt: PromptFormat = PromptFormat(),
                choices: Sequence[str] | None = None) -> str:
    return fmt.render(sentence, answer_word, choices)


def icl_block(sentence: str, label_word: str, answer_word: str, fmt: PromptFormat = PromptFormat(),
              choices: Sequence[str] | None = None) -> str:
    return f"{query_block(sentence, answer_word, fmt, choices)} {label_word}\n\n"


def icl_context(instruction: str, examples: Sequence[tuple], answer_word: str,
                fmt: PromptFormat = PromptFormat()) -> str:
    """The text every prompt starts with: instruction, then one block per example, each
    (sentence, label word) or, for multiple choice, (question, label word, choices)."""
    return instruction + "".join(icl_block(e[0], e[1], answer_word, fmt, e[2] if len(e) > 2 else None)
                                 for e in examples)


def build_prompts(sentences: Sequence[str], *, instruction: str, answer_word: str,
                  examples: Sequence[tuple] = (), fmt: PromptFormat = PromptFormat(),
                  choices: Sequence[Sequence[str]] | None = None) -> list[str]:
    context = icl_context(instruction, examples, answer_word, fmt)
    if choices is None:
        return [context + query_block(s, answer_word, fmt) for s in sentences]
    return [context + query_block(s, answer_word, fmt, c) for s, c in zip(sentences, choices, strict=True)]


def select_icl_examples(candidate_labels: np.ndarray, n: int, *, n_classes: int, seed: int,
                        selection: str = "class-proportional") -> np.ndarray:
    """Positions (into the candidate list) of `n` in-context examples, in prompt order.

    `class-proportional` (the paper, appendix "In-context examples"): each class gets its share of
    `n` by its frequency among the candidates (largest remainder), drawn at random within the
    class, then the `n` are put in one random order. `random` (the reference code): the first `n`
    of a random permutation of the candidates. Deterministic in `seed`, so every model that is
    evaluated with the same subsets, `n` and seed sees the same examples in the same order.
    """
    candidate_labels = np.asarray(candidate_labels)
    if selection not in ICL_SELECTIONS:
        raise UserError(f"--icl-selection must be one of {', '.join(ICL_SELECTIONS)}, not {selection!r}")
    if n < 0:
        raise UserError(f"--icl must be >= 0, not {n}")
    if n > len(candidate_labels):
        raise UserError(f"--icl {n} asks for more in-context examples than the "
                        f"{len(candidate_labels)} ICL candidates (raise --icl-candidates)")
    if n == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, 0x1C1])  # a stream of its own, apart from the subset draw
    if selection == "random":
        return rng.permutation(len(candidate_labels))[:n].astype(np.int64)
    counts = np.bincount(candidate_labels, minlength=n_classes)
    share = counts / counts.sum() * n
    take = np.floor(share).astype(np.int64)
    # Largest remainder; ties go to the lower class id so the choice is deterministic.
    for c in np.argsort(-(share - take), kind="stable")[: n - take.sum()]:
        take[c] += 1
    chosen = [rng.choice(np.flatnonzero(candidate_labels == c), size=take[c], replace=False)
              for c in range(n_classes) if take[c] > 0]
    return rng.permutation(np.concatenate(chosen)).astype(np.int64)


def resolve_label_tokens(tokenize: Callable[[list[str]], list[list[int]]], prompt: str,
                         label_words: Sequence[str], *, multi_token: str = "error",
                         decode: Callable[[list[int]], str] | None = None) -> list[int]:
    """The token id that follows `prompt` for each label word (spec 2.3).

    Tokenises `prompt` and `prompt + " " + word` whole and takes the first token after the prompt's
    tokens. A word whose continuation is several tokens is refused (`multi_token="error"`) or read
    from its first token (`"first"`, the paper's choice for Subj's "subjective"); words that share
    their first token cannot be told apart from one logit and are always refused.
    """
    if multi_token not in MULTI_TOKEN_POLICIES:
        raise UserError(f"--multi-token-labels must be one of {', '.join(MULTI_TOKEN_POLICIES)}, "
                        f"not {multi_token!r}")
    if len(label_words) < 2:
        raise UserError(f"--label-words needs at least 2 words, got {list(label_words)}")
    if len(set(label_words)) != len(label_words):
        raise UserError(f"--label-words has a repeated word: {list(label_words)}")
    base, *with_words = tokenize([prompt] + [f"{prompt} {w}" for w in label_words])
    show = decode or (lambda ids: str(ids))
    token_ids = []
    for word, ids in zip(label_words, with_words):
        if ids[: len(base)] != base or len(ids) == len(base):
            raise UserError(f"label word {word!r} merges with the end of the prompt when tokenised "
                            f"(prompt ends {prompt[-20:]!r}); pick another --answer-word or word")
        rest = ids[len(base):]
        if len(rest) > 1 and multi_token == "error":
            pieces = ", ".join(repr(show([t])) for t in rest)
            raise UserError(f"label word {word!r} is {len(rest)} tokens after the prompt ({pieces}), "
                            f"not one; use a one-token word or --multi-token-labels first")
        token_ids.append(int(rest[0]))
    if len(set(token_ids)) != len(token_ids):
        clash = [(w, t) for w, t in zip(label_words, token_ids) if token_ids.count(t) > 1]
        raise UserError(f"label words {[w for w, _ in clash]} start with the same token {show([clash[0][1]])!r}, "
                        f"so one token cannot tell them apart; choose other --label-words")
    return token_ids
