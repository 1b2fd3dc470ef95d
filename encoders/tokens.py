"""Text checks shared by every text tower: an empty text, a non-string or a lone surrogate is
refused before any tokenizer sees it (a Rust tokenizer raises for the whole batch on one). The
token count and the policy (truncate visibly or refuse) live with each family, which counts with
the model's own tokenizer."""

from __future__ import annotations

from mmembed.encoders.base import EmptyInput, InputError


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
