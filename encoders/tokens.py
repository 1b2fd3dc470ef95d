"""Token pre-validation shared by every text tower.

open_clip and sentence-transformers truncate over-long text silently; here the count is
taken first and the caller's policy decides: ``truncate`` (the result reports how many
tokens were dropped) or ``error`` (a TooManyTokens naming the count and the limit).
"""

from __future__ import annotations

from mmembed.encoders.base import EmptyInput, InputError, TooManyTokens


def check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise EmptyInput("text is empty")
    try:  # a lone surrogate (JSON allows "\ud800") makes Rust tokenizers raise for the whole batch
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"text is not valid Unicode: a lone surrogate at position {exc.start}") from exc
    return text


def fit_tokens(
    ids: list[int], *, limit: int, specials: int, policy: str, model: str
) -> tuple[list[int], dict[str, int]]:
    """``ids`` are the content tokens; ``limit`` counts the ``specials`` (start/end) too."""
    total = len(ids) + specials
    if total <= limit:
        return ids, {"tokens": total, "truncated_tokens": 0}
    if policy == "error":
        raise TooManyTokens(total, limit, model)
    keep = limit - specials
    return ids[:keep], {"tokens": limit, "truncated_tokens": total - limit}
