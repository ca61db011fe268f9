"""Prompts, in-context examples and label tokens for label-token classification (spec section 4).

The reference's prompt (`dataset_class.py:98-99`, `evaluation.py:132-141`), kept byte for byte:

    zero-shot:  "{instruction}Sentence: '{s}' \\n{Answer}:"
    N-shot:     instruction + N x "Sentence: '{s_k}' \\n{Answer}: {word_k}\\n\\n" + the zero-shot query

Note the space before the newline and the single quotes. Sentences are `.strip()`ped first (SST-2
rows end with a space). The model's prediction is read from the logits of the token that would
follow the prompt, restricted to one token per label word: the first token of " {word}" when it is
appended to a real prompt (spec 2.3; on SmolLM2 " positive" = 2731, " negative" = 3524).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from jaxprobe.errors import UserError

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


def query_block(sentence: str, answer_word: str) -> str:
    return f"Sentence: '{sentence.strip()}' \n{answer_word}:"


def icl_block(sentence: str, label_word: str, answer_word: str) -> str:
    return f"{query_block(sentence, answer_word)} {label_word}\n\n"


def icl_context(instruction: str, examples: Sequence[tuple[str, str]], answer_word: str) -> str:
    """The text every prompt starts with: instruction, then one block per (sentence, label word)."""
    return instruction + "".join(icl_block(s, w, answer_word) for s, w in examples)


def build_prompts(sentences: Sequence[str], *, instruction: str, answer_word: str,
                  examples: Sequence[tuple[str, str]] = ()) -> list[str]:
    context = icl_context(instruction, examples, answer_word)
    return [context + query_block(s, answer_word) for s in sentences]


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
