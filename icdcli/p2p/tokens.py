"""Prompt-to-Prompt's token alignment: which tokens of the target prompt take the attention of which tokens
of the source (Replace for prompts of as many words, Refine from a global alignment otherwise), and where a
word's tokens are (for reweighting and the blend words)."""

from __future__ import annotations

import string

import torch

STOPWORDS = frozenset(
    "a an the and or but of in on at to with without for from by as is are was were be been this that these "
    "those it its his her their my your our into onto over under near".split()
)


def _word_spans(tokenizer, prompt: str) -> list[tuple[str, range]]:
    """Each space-split word, bare, with the positions of its own tokens (not its punctuation's)."""
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0  # noqa: E731
    spans, start = [], 1
    for word in prompt.split():
        core = bare_word(word)
        lead = count(word[: len(word) - len(word.lstrip(string.punctuation))])
        spans.append((core, range(start + lead, start + lead + count(core))))
        start += count(word)
    return spans


def bare_word(word: str) -> str:
    """A prompt word without case or surrounding punctuation: "Cat," matches "cat" (the official code
    compared raw words, so a comma silently disabled blends and reweights)."""
    return word.lower().strip(string.punctuation)


def prompt_words(prompt: str) -> list[str]:
    return [bare_word(w) for w in prompt.split()]


def word_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of all tokens of every occurrence of the whole word (case and punctuation ignored)."""
    last = tokenizer.model_max_length - 1  # the end token's place when the prompt is truncated
    wanted = bare_word(word)
    return [p for w, span in _word_spans(tokenizer, prompt) if w == wanted for p in span if p < last]


def replacement_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """(L, L) weights W, target cross-attention = source cross-attention @ W, for equal word counts: a source
    word's attention is spread over the target word's tokens as their places inside the words overlap."""
    length = tokenizer.model_max_length
    weights = torch.zeros(length, length)
    weights[0, 0] = 1.0
    source_spans, target_spans = _word_spans(tokenizer, source), _word_spans(tokenizer, target)
    for (_, src), (_, tgt) in zip(source_spans, target_spans, strict=True):
        for k, s in enumerate(src):
            for j, t in enumerate(tgt):
                overlap = min((k + 1) * len(tgt), (j + 1) * len(src)) - max(k * len(tgt), j * len(src))
                if overlap > 0 and max(s, t) < length - 1:
                    weights[s, t] = overlap / len(tgt)
    # The end token and the padding follow on from the last word.
    source_end = min(source_spans[-1][1].stop if source_spans else 1, length - 1)
    target_end = min(target_spans[-1][1].stop if target_spans else 1, length - 1)
    for t in range(target_end, length):
        weights[min(t - target_end + source_end, length - 1), t] = 1.0
    return weights


def refinement_mapper(tokenizer, source: str, target: str) -> list[int | None]:
    """For each target token position, its globally aligned source position (Needleman-Wunsch on the token ids:
    match +1, mismatch -1, gap 0), or None for a new token; the padding follows the source's."""
    length = tokenizer.model_max_length
    a = tokenizer(source, truncation=True).input_ids
    b = tokenizer(target, truncation=True).input_ids
    score = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            diagonal = score[i - 1][j - 1] + (1 if a[i - 1] == b[j - 1] else -1)
            score[i][j] = max(score[i - 1][j], score[i][j - 1], diagonal)
    mapping: list[int | None] = [None] * len(b)
    i, j = len(a), len(b)
    while i and j:
        if a[i - 1] == b[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            i, j = i - 1, j - 1
            mapping[j] = i
        elif score[i][j] == score[i][j - 1]:
            j -= 1
        else:
            i -= 1
    return mapping + [min(t - len(b) + len(a), length - 1) for t in range(len(b), length)]


