"""Token ids in ``/v1/embeddings``, as OpenAI clients send them: LangChain's
``OpenAIEmbeddings`` tokenises with tiktoken by default and sends ids, in ``cl100k_base`` for a
model name tiktoken does not know. They are decoded back to the exact text (byte-level BPE
loses nothing), which the model then tokenises with its own tokenizer."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from mmembed.serve.http.errors import ApiError

HINT = "or send text (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))"


@functools.cache
def _encoding(name: str) -> Any:
    import tiktoken  # only for clients that send ids; loading the ranks takes a second

    return tiktoken.get_encoding(name)


async def decode(arrays: list[list[int]], encoding: str | None) -> list[str]:
    """Each array's text; refuses ids outside the encoding, or ids at all when no encoding is set."""
    if encoding is None:
        raise ApiError(422, "token_arrays_unsupported", f"this server takes no token ids; {HINT}")
    try:
        codec = await asyncio.to_thread(_encoding, encoding)
    except Exception as exc:  # tiktoken downloads the ranks on first use: offline, name where they go
        message = (
            f"cannot load the {encoding} tokenizer to read token ids ({type(exc).__name__}: {exc}); "
            f"put its file in TIKTOKEN_CACHE_DIR, {HINT}"
        )
        raise ApiError(422, "token_arrays_unsupported", message) from exc
    texts = []
    for n, ids in enumerate(arrays):
        bad = next((i for i in ids if not 0 <= i < codec.n_vocab), None)
        if bad is not None:
            raise ApiError(422, "invalid_token_ids", f"input[{n}]: token id {bad} is not in {encoding}")
        try:
            texts.append(codec.decode(ids, errors="strict"))
        except (KeyError, ValueError) as exc:
            raise ApiError(422, "invalid_token_ids", f"input[{n}]: not {encoding} ids of UTF-8 text ({exc})") from exc
    return texts
