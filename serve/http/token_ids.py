"""Token ids in ``/v1/embeddings``, as OpenAI clients send them: LangChain's
``OpenAIEmbeddings`` tokenises with tiktoken by default and sends ids, in ``cl100k_base`` for a
model name tiktoken does not know. They are decoded back to the exact text (byte-level BPE
loses nothing), which the model then tokenises with its own tokenizer."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

from mmembed.encoders.config import ModelsConfig
from mmembed.encoders.remote.tokens import find_encoding_file, load_encoding
from mmembed.serve.http.errors import ApiError

HINT = "or send text (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))"


@functools.cache
def _encoding(path: Path, name: str) -> Any:
    return load_encoding(path, name)


async def decode(arrays: list[list[int]], encoding: str | None, config: ModelsConfig) -> list[str]:
    """Each array's text; refuses ids outside the encoding, or ids at all when no encoding is set.
    The encoding file is found where the remote models' token counters look
    (``MMEMBED_REMOTE_TOKENIZER_DIR``, tiktoken's cache) and never downloaded."""
    if encoding is None:
        raise ApiError(422, "token_arrays_unsupported", f"this server takes no token ids; {HINT}")
    path = find_encoding_file(encoding, config)
    if path is None:
        message = f"{encoding}.tiktoken is not on this server: put it in MMEMBED_REMOTE_TOKENIZER_DIR, {HINT}"
        raise ApiError(422, "token_arrays_unsupported", message)
    try:
        codec = await asyncio.to_thread(_encoding, path, encoding)
    except Exception as exc:
        message = f"cannot read the {encoding} tokenizer in {path} ({type(exc).__name__}: {exc}); {HINT}"
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
