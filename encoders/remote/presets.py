"""Remote model names: the built-in ``openai:MODEL`` and ``cohere:MODEL`` forms, and the ones the
configuration adds (``MMEMBED_REMOTE_MODELS`` / ``MMEMBED_REMOTE_MODELS_FILE``), such as another
mmembed server or an Azure OpenAI deployment."""

from __future__ import annotations

from mmembed.encoders.base import UnknownModel
from mmembed.encoders.config import PROVIDERS, ModelsConfig, RemoteModelConfig

DIMS: dict[str, dict[str, int]] = {
    "openai": {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536},
    "cohere": {
        "embed-english-v3.0": 1024,
        "embed-multilingual-v3.0": 1024,
        "embed-english-light-v3.0": 384,
        "embed-multilingual-light-v3.0": 384,
    },
}


def builtin_names() -> list[str]:
    return [f"{kind}:{model}" for kind, models in DIMS.items() for model in models]


def remote_config(name: str, config: ModelsConfig) -> RemoteModelConfig | None:
    """The configuration behind a remote model name, or None when the name is not a remote one."""
    configured = config.remote_models
    if name in configured:
        return configured[name]
    kind, sep, model = name.partition(":")
    if not sep or kind not in PROVIDERS:
        return None
    dim = DIMS[kind].get(model)
    if dim is None:
        raise UnknownModel(
            f"{name!r}: {kind} model {model!r} has no known vector size; known: {', '.join(DIMS[kind])}. "
            "Configure it in MMEMBED_REMOTE_MODELS with its dim"
        )
    return RemoteModelConfig(name=name, kind=kind, model=model, dim=dim, **PROVIDERS[kind])  # type: ignore[arg-type]
