"""mmembed's LangChain integration against the real packages and a real server: the
``Embeddings`` class for texts and images, and the ``ByteStore`` that lets LangChain's
``CacheBackedEmbeddings`` share the server's embedding cache."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from langchain_classic.embeddings import CacheBackedEmbeddings
from PIL import Image
from ray import serve

from mmembed.encoders import LoadedModel, Modality
from mmembed.langchain import MmembedByteStore, MmembedEmbeddings
from mmembed.serve.app import build_app


@pytest.fixture(scope="module")
def servers(ray_cluster: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """demo-clip twice: with a SQLite embedding cache, and without any. Yields both URLs and the cache's."""
    cache_url = f"sqlite:///{tmp_path_factory.mktemp('lc-cache') / 'cache.sqlite'}"
    models = [{"name": "demo-clip"}]
    serve.run(build_app({"models": models, "env": {"MMEMBED_CACHE_URL": cache_url}}), name="lc", route_prefix="/lc")
    serve.run(build_app({"models": models}), name="lc-nocache", route_prefix="/lc-nocache")
    base = f"http://127.0.0.1:{ray_cluster}"
    yield f"{base}/lc", f"{base}/lc-nocache", cache_url
    serve.delete("lc")
    serve.delete("lc-nocache")


def test_embeddings_take_texts_and_images(servers, demo_clip: LoadedModel, tmp_path: Path) -> None:
    url, _, _ = servers
    embeddings = MmembedEmbeddings("demo-clip", base_url=url)
    texts = ["a red circle", "a blue square"]
    documents = embeddings.embed_documents(texts)
    local = demo_clip.encoder(Modality.TEXT).encode_items(texts)
    for vector, mine in zip(documents, local, strict=True):
        assert np.allclose(vector, mine.vector, atol=1e-5)
    assert np.allclose(embeddings.embed_query("a red circle"), documents[0], atol=1e-6)
    assert np.allclose(asyncio.run(embeddings.aembed_documents(texts)), documents, atol=1e-6)
    picture = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (230, 20, 20)).save(picture)
    [image] = embeddings.embed_image([str(picture)])
    [mine] = demo_clip.encoder(Modality.IMAGE).encode_items([Image.open(picture)])
    assert np.allclose(image, mine.vector, atol=1e-5)
    with pytest.raises(httpx.HTTPStatusError, match="empty_input"):
        embeddings.embed_documents(["fine", ""])


def test_cache_backed_embeddings_share_the_servers_cache(servers) -> None:
    url, uncached_url, cache_url = servers
    store = MmembedByteStore.for_server(url, "demo-clip", cache_url)
    # What the server embedded, LangChain finds: its underlying model is not even reachable.
    served = httpx.post(f"{url}/encode/text", json={"model": "demo-clip", "texts": ["a green triangle"]}, timeout=60)
    unreachable = MmembedEmbeddings("demo-clip", base_url="http://127.0.0.1:9")
    offline = CacheBackedEmbeddings.from_bytes_store(unreachable, store, key_encoder=store.key_encoder)
    assert np.allclose(offline.embed_documents(["a green triangle"])[0], served.json()["data"][0]["embedding"])
    # What LangChain stored (from a server without a cache), the server answers from its cache.
    elsewhere = MmembedEmbeddings("demo-clip", base_url=uncached_url)
    cached = CacheBackedEmbeddings.from_bytes_store(elsewhere, store, key_encoder=store.key_encoder)
    [vector] = cached.embed_documents(["a purple cross"])
    again = httpx.post(f"{url}/encode/text", json={"model": "demo-clip", "texts": ["a purple cross"]}, timeout=60)
    item = again.json()["data"][0]
    assert item["info"].get("cached") is True and np.allclose(item["embedding"], vector, atol=1e-6)
    with pytest.raises(ValueError, match="not served"):
        MmembedByteStore.for_server(url, "all-MiniLM-L6-v2", cache_url)
