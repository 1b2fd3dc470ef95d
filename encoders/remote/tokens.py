"""Counting tokens before a text is sent, so limits, rate budgets and costs are known up front.

A real tokenizer where one can be had offline: tiktoken's BPE for OpenAI's models when its
encoding file is already on disk (tiktoken's cache, ``MMEMBED_REMOTE_TOKENIZER_DIR``, or a path
given as the model's ``tokenizer``). This module never downloads one: tiktoken would fetch it
from the internet on first use, which air-gapped machines cannot do and servers should not do
while answering a request.

Otherwise a conservative estimate: **UTF-8 bytes + 2**. Byte-level BPE (tiktoken, Cohere) and
WordPiece (an mmembed server's MiniLM) never make more than one token per byte, and the 2
covers start/end tokens, so the estimate never under-counts; it over-counts English about
fourfold, which makes rate limits and price estimates safe upper bounds rather than guesses.
Every count says which of the two produced it (``info["token_count"]``).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmembed.encoders.base import ModelNotAvailable, TooManyTokens
from mmembed.encoders.config import ModelsConfig, RemoteModelConfig
from mmembed.encoders.tokens import check_text

ESTIMATE = "estimate:utf8-bytes+2"
ESTIMATE_SPECIALS = 2

# The encodings OpenAI's embedding models use.
OPENAI_ENCODINGS = {
    "text-embedding-3-small": "cl100k_base",
    "text-embedding-3-large": "cl100k_base",
    "text-embedding-ada-002": "cl100k_base",
}
# cl100k_base's pre-tokenisation pattern (from tiktoken_ext.openai_public); also used for files of unknown origin.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


@dataclass
class TokenCounter:
    """``method`` names what counts: ``tiktoken:cl100k_base`` or the estimate."""

    method: str
    _encode: Callable[[str], list[int]] | None = None
    _decode: Callable[[list[int]], str] | None = None

    @property
    def exact(self) -> bool:
        return self._encode is not None

    def count(self, text: str) -> int:
        if self._encode is not None:
            return len(self._encode(text))
        return len(text.encode("utf-8")) + ESTIMATE_SPECIALS

    def fit(self, text: object, limit: int, policy: str, model: str) -> tuple[str, dict[str, Any]]:
        """The text as it will be sent, and what was counted: over ``limit`` it is cut to fit
        (``truncated_tokens`` says how much went) or refused with TooManyTokens, per ``policy``."""
        text = check_text(text)
        tokens = self.count(text)
        info: dict[str, Any] = {"tokens": tokens, "truncated_tokens": 0, "token_count": self.method}
        if tokens <= limit:
            return text, info
        if policy == "error":
            raise TooManyTokens(tokens, limit, model)
        if self._encode is not None and self._decode is not None:
            text = self._decode(self._encode(text)[:limit])
        else:  # the estimate is bytes + 2: keep limit - 2 bytes, cut back to a whole character
            text = text.encode("utf-8")[: limit - ESTIMATE_SPECIALS].decode("utf-8", errors="ignore")
        kept = self.count(text)
        return text, info | {"tokens": kept, "truncated_tokens": tokens - kept}


def estimate() -> TokenCounter:
    return TokenCounter(ESTIMATE)


def read_tiktoken_file(path: Path) -> dict[bytes, int]:
    """A .tiktoken file (one ``base64-token rank`` per line), read directly: tiktoken's own
    loader would also copy a local file into its cache folder."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def load_encoding(path: Path, name: str) -> Any:
    """A ``tiktoken.Encoding`` from its ranks file, with no network: tiktoken's own loader would
    download the file wherever its cache misses."""
    try:
        import tiktoken
    except ImportError as exc:  # a dependency of this project; only a trimmed install lacks it
        raise ModelNotAvailable(f"tiktoken is not installed, so {path} cannot be read: pip install tiktoken") from exc

    return tiktoken.Encoding(name, pat_str=CL100K_PATTERN, mergeable_ranks=read_tiktoken_file(path), special_tokens={})


def tiktoken_counter(path: Path, name: str) -> TokenCounter:
    encoding = load_encoding(path, name)
    return TokenCounter(f"tiktoken:{name}", lambda t: encoding.encode(t, disallowed_special=()), encoding.decode)


def find_encoding_file(name: str, config: ModelsConfig) -> Path | None:
    """``name``.tiktoken in the configured folder, or the copy tiktoken cached when it last downloaded it."""
    candidates = []
    if config.remote_tokenizer_dir is not None:
        candidates.append(config.remote_tokenizer_dir.expanduser() / f"{name}.tiktoken")
    if config.tiktoken_cache_dir is not None:
        candidates.append(config.tiktoken_cache_dir / hashlib.sha1(BLOB_URL.format(name).encode()).hexdigest())
    return next((p for p in candidates if p.is_file()), None)


def counter_for(remote: RemoteModelConfig, config: ModelsConfig) -> TokenCounter:
    """The best counter this machine has for the model, without touching the network."""
    choice = remote.tokenizer
    if choice == "estimate":
        return estimate()
    if choice.endswith(".tiktoken") or "/" in choice:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise ModelNotAvailable(f"remote model {remote.name!r}: tokenizer file {path} does not exist")
        return tiktoken_counter(path, path.name.removesuffix(".tiktoken"))
    name = OPENAI_ENCODINGS.get(remote.model) if choice == "auto" and remote.kind == "openai" else None
    name = name if choice == "auto" else choice
    if name is None:
        return estimate()
    path = find_encoding_file(name, config)
    if path is not None:
        return tiktoken_counter(path, name)
    if choice == "auto":
        return estimate()
    raise ModelNotAvailable(
        f"remote model {remote.name!r}: tiktoken encoding {name!r} is not on this machine; put {name}.tiktoken "
        "in MMEMBED_REMOTE_TOKENIZER_DIR, or use tokenizer 'auto' or 'estimate'"
    )
