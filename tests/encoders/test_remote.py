"""Remote encoders against a real local HTTP provider (tests/remote_stub.py): both request shapes,
batching to the provider's limits, rate limits that the provider's own books show were never
exceeded, Retry-After, backoff, the concurrency cap, failures past the retry budget, token
counting with truncation and refusal, prices and costs."""

from __future__ import annotations

import base64
import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from remote_stub import StubProvider, stub_tokens, stub_vector
from tenacity import RetryCallState

from mmembed.config import RemoteModelConfig, Settings
from mmembed.encoders import (
    EncoderError,
    ModelNotAvailable,
    TooManyTokens,
    UnknownModel,
    is_provisioned,
    load,
    pull,
    resolve,
)
from mmembed.encoders.remote import DimensionMismatch, RemoteEncoder, price_for, remote_config
from mmembed.encoders.remote.rate_limit import RateLimiter
from mmembed.encoders.remote.retry import WaitBackoffOrRetryAfter, retry_after
from mmembed.encoders.remote.tokens import ESTIMATE, counter_for, tiktoken_counter

FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 2.0}


@pytest.fixture
def remote_settings(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("STUB_API_KEY", "stub-secret-key")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))  # no cached BPE files here
    return settings.model_copy(update={"data_dir": tmp_path / "data"})


def encoder(stub: StubProvider, settings: Settings, **overrides) -> RemoteEncoder:
    config = RemoteModelConfig.model_validate(stub.config(**(FAST | overrides)))
    enc = load(config.name, settings.model_copy(update={"remote_models": [config]}).models_config()).encoder("text")
    assert isinstance(enc, RemoteEncoder)
    return enc


def expected(text: str, dim: int) -> np.ndarray:
    v = stub_vector(text, dim)
    return v / np.linalg.norm(v)


# --- names, provisioning, keys ---------------------------------------------------------------


def test_remote_names_resolve_without_weights_and_need_their_key(remote_settings, monkeypatch):
    spec = resolve("openai:text-embedding-3-small", remote_settings.models_config())
    assert (spec.family, spec.source, spec.dim, spec.offline) == ("remote", "remote", 1536, False)
    assert resolve("cohere:embed-multilingual-v3.0", remote_settings.models_config()).dim == 1024
    assert is_provisioned(spec, remote_settings.models_config())
    pull("openai:text-embedding-3-small", remote_settings.models_config())  # nothing to fetch, nothing written
    assert not remote_settings.models_path.exists() or not any(remote_settings.models_path.iterdir())
    with pytest.raises(UnknownModel, match="no known vector size"):
        resolve("openai:text-embedding-4-huge", remote_settings.models_config())
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ModelNotAvailable, match="OPENAI_API_KEY"):
        load("openai:text-embedding-3-small", remote_settings.models_config())
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-never-shown")
    loaded = load("openai:text-embedding-3-small", remote_settings.models_config())
    enc = loaded.encoder("text")
    assert enc.url == "https://api.openai.com/v1/embeddings" and enc.dim == 1536
    assert "sk-test-never-shown" not in repr(enc) + repr(enc.__dict__) + str(loaded.describe())


def test_configured_models_come_from_env_json_and_from_a_yaml_file(remote_settings, tmp_path, monkeypatch):
    monkeypatch.setenv("MMEMBED_REMOTE_MODELS", '[{"name": "team", "base_url": "http://x/v1", "model": "m", "dim": 8}]')
    file = tmp_path / "remote.yaml"
    file.write_text(
        "- name: azure-small\n  base_url: https://r.openai.azure.com/openai/deployments/small\n"
        "  model: text-embedding-3-small\n  dim: 1536\n  api_key_env: AZURE_OPENAI_API_KEY\n"
        "  auth_header: api-key\n  auth_scheme: ''\n  query: {api-version: '2024-02-01'}\n"
    )
    settings = Settings(data_dir=tmp_path, remote_models_file=file)
    assert resolve("team", settings.models_config()).dim == 8
    azure = remote_config("azure-small", settings.models_config())
    assert azure is not None and azure.auth_header == "api-key" and azure.query == {"api-version": "2024-02-01"}
    assert price_for(azure, settings.models_config()) == 0.02  # priced by its provider model name
    assert resolve("azure-small", settings.models_config()).ref.endswith(
        "/deployments/small/embeddings text-embedding-3-small"
    )


# --- shapes and batching ---------------------------------------------------------------------


def test_openai_shape_batches_at_2048_inputs_and_returns_normalised_vectors(remote_settings):
    texts = [f"item number {i}" for i in range(5000)]
    with StubProvider(dim=16) as stub:
        results = encoder(stub, remote_settings).encode_items(texts)
    assert sorted(len(c.texts) for c in stub.calls) == [904, 2048, 2048]  # concurrent: any order
    assert all(c.shape == "openai" and c.outcome == "ok" for c in stub.calls)
    for text, r in zip(texts[::497], results[::497], strict=True):
        assert r.vector.dtype == np.float32 and r.vector.shape == (16,)
        assert np.allclose(r.vector, expected(text, 16), atol=1e-6)  # the answer is in index order
    assert set(stub.delivered.values()) == {1} and len(stub.delivered) == 5000


def test_cohere_shape_batches_at_96_texts_and_reads_billed_units(remote_settings):
    texts = [f"cohere text {i}" for i in range(200)]
    with StubProvider(dim=12) as stub:
        enc = encoder(stub, remote_settings, kind="cohere", usd_per_million_tokens=100.0)
        results = enc.encode_items(texts)
    assert sorted((c.shape, len(c.texts)) for c in stub.calls) == [("cohere", 8), ("cohere", 96), ("cohere", 96)]
    assert all(np.allclose(r.vector, expected(t, 12), atol=1e-6) for t, r in zip(texts, results, strict=True))
    billed = sum(stub_tokens(t) for t in texts)
    assert enc.meter.total.tokens_billed == billed  # the provider's own count, not the (larger) estimate
    assert enc.meter.total.tokens_counted > billed
    assert enc.meter.total.usd == pytest.approx(billed * 100.0 / 1e6)


def test_calls_respect_the_token_budget_per_call(remote_settings):
    texts = [("word " * (i % 7 + 1)).strip() for i in range(40)]
    with StubProvider() as stub:
        enc = encoder(stub, remote_settings, max_call_tokens=60)
        enc.encode_items(texts)
    sizes = [sum(enc.counter.count(t) for t in c.texts) for c in stub.calls]
    assert max(sizes) <= 60 and len(stub.calls) > 40 * 7 // 60
    assert sorted(t for c in stub.calls for t in c.texts) == sorted(texts)


# --- rate limits, retries, concurrency -------------------------------------------------------


def test_the_limiter_keeps_every_window_under_rpm_and_tpm_on_an_injected_clock():
    now = [0.0]
    limiter = RateLimiter(
        rpm=3,
        tpm=100,
        window_s=60.0,
        concurrency=8,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )
    admitted = []
    for tokens in [10, 10, 10, 50, 60, 5, 40, 40, 40, 1]:
        ticket = limiter.acquire(tokens)
        admitted.append((now[0], tokens))
        now[0] += 0.5  # each request takes half a second
        limiter.settle(ticket)
    for start, _ in admitted:
        inside = [t for at, t in admitted if start <= at < start + 60.0]
        assert len(inside) <= 3 and sum(inside) <= 100
    assert admitted[3][0] == pytest.approx(60.5)  # the 4th waits for the 1st's window, counted from its answer
    limiter.pause(30.0)
    before = now[0]
    limiter.acquire(1)
    assert now[0] >= before + 30.0


def test_rpm_and_tpm_are_never_exceeded_at_the_provider(remote_settings):
    texts = [f"limited {i:03d} text" for i in range(24)]
    # The stub counts tokens exactly as the client's estimate does, so the budget is tight.
    with StubProvider(rpm=4, tpm=90, window_s=0.4, count=lambda t: len(t.encode()) + 2) as stub:
        enc = encoder(stub, remote_settings, max_inputs=2, concurrency=4, tokenizer="estimate")
        started = time.monotonic()
        results = enc.encode_items(texts)
        elapsed = time.monotonic() - started
    assert all(r.ok for r in results) and stub.over_limit == 0
    requests, tokens = stub.max_in_any_window()
    assert requests <= 4 and tokens <= 90
    assert elapsed >= 0.4 * (12 / 4 - 1)  # 12 calls at 4 per window had to wait
    assert enc.meter.total.throttled_s > 0


def test_without_the_limiter_the_stub_would_have_refused(remote_settings):
    """The check above can fail: the same load with no client limits trips the stub's."""
    with StubProvider(rpm=4, window_s=1.0) as stub:
        enc = encoder(stub, remote_settings, max_inputs=2, concurrency=4, rpm=None, max_attempts=1)
        results = enc.encode_items([f"t{i}" for i in range(24)])
    assert stub.over_limit > 0 and any(r.error is not None and r.error.code == "provider_failed" for r in results)


def test_retry_after_is_honoured_and_the_call_succeeds(remote_settings):
    with StubProvider(faults={0: "429"}, retry_after_s=0.4) as stub:
        enc = encoder(stub, remote_settings)
        [r] = enc.encode_items(["try again later"])
    assert r.ok and [c.outcome for c in stub.calls] == ["429", "ok"]
    assert stub.retry_after_gaps[0] >= 0.4
    assert enc.meter.total.retries == 1


def test_500s_timeouts_and_dropped_connections_are_retried_with_every_text_embedded_once(remote_settings):
    texts = [f"fault {i}" for i in range(12)]
    faults = {0: "500", 1: "drop", 2: "slow", 3: "500", 5: "drop", 7: "slow"}
    with StubProvider(faults=faults, slow_s=5.0) as stub:
        enc = encoder(stub, remote_settings, max_inputs=3, concurrency=2, timeout_s=0.3, max_attempts=8)
        results = enc.encode_items(texts)
    assert all(r.ok for r in results)
    assert all(np.allclose(r.vector, expected(t, stub.dim), atol=1e-6) for t, r in zip(texts, results, strict=True))
    assert sorted(c.outcome for c in stub.calls if c.outcome != "ok") == ["500", "500", "drop", "drop", "slow", "slow"]
    assert dict(stub.delivered) == dict.fromkeys(texts, 1)
    assert enc.meter.total.retries == 6 and enc.meter.total.calls == 4


def test_backoff_grows_exponentially_with_jitter_and_never_undercuts_retry_after():
    wait = WaitBackoffOrRetryAfter(initial=0.5, maximum=4.0)

    class Outcome:
        def __init__(self, exc):
            self.exc = exc

        def exception(self):
            return self.exc

    def state(attempt: int, exc: Exception | None = None) -> RetryCallState:
        s = RetryCallState(None, None, (), {})
        s.attempt_number, s.outcome = attempt, Outcome(exc or RuntimeError())
        return s

    for attempt in range(1, 8):
        waits = [wait(state(attempt)) for _ in range(200)]
        assert max(waits) <= min(4.0, 0.5 * 2 ** (attempt - 1)) + 1e-9
        assert len({round(w, 6) for w in waits}) > 100  # jittered, not fixed
    assert np.mean([wait(state(4)) for _ in range(400)]) > 2 * np.mean([wait(state(1)) for _ in range(400)])
    from mmembed.encoders.remote.retry import Retryable

    assert min(wait(state(1, Retryable("429", 429, retry_after=3.0))) for _ in range(50)) >= 3.0


def test_retry_after_headers_are_read_in_every_form():
    import httpx

    assert retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert retry_after(httpx.Headers({"retry-after": "2"})) == 2.0
    assert retry_after(httpx.Headers({"retry-after": "0.4"})) == 0.4
    assert retry_after(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}), now=lambda: 1445412480.0) == 10
    assert retry_after(httpx.Headers({"retry-after": "86400000"})) == 600.0
    assert retry_after(httpx.Headers({})) is None


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_semaphore_caps_requests_in_flight(remote_settings, concurrency):
    with StubProvider(delay_s=0.1) as stub:
        enc = encoder(stub, remote_settings, max_inputs=1, concurrency=concurrency)
        assert all(r.ok for r in enc.encode_items([f"c{i}" for i in range(9)]))
    assert stub.max_in_flight == concurrency


def test_a_call_failing_past_its_budget_fails_only_its_items(remote_settings):
    texts = [f"budget {i}" for i in range(6)]
    with StubProvider(faults={0: "500", 1: "500"}) as stub:
        enc = encoder(stub, remote_settings, max_inputs=2, concurrency=1, max_attempts=2)
        results = enc.encode_items(texts)
    assert [r.error.code if r.error else "ok" for r in results] == ["provider_failed"] * 2 + ["ok"] * 4
    assert "gave up after 2 tries" in str(results[0].error)
    assert enc.meter.total.failed_inputs == 2 and enc.meter.total.failed_calls == 1
    assert stub.delivered["budget 0"] == 0 and stub.delivered["budget 5"] == 1


def test_an_input_the_provider_refuses_is_isolated_and_the_rest_embedded(remote_settings):
    texts = [f"fine {i}" for i in range(7)] + ["forbidden words"]
    with StubProvider(reject=frozenset({"forbidden words"})) as stub:
        results = encoder(stub, remote_settings).encode_items(texts)
    assert [r.ok for r in results] == [True] * 7 + [False]
    assert results[-1].error.code == "provider_rejected"
    assert dict(stub.delivered) == dict.fromkeys(texts[:7], 1)


def test_wrong_dimension_and_refused_keys_are_clear_errors_that_never_show_the_key(remote_settings, monkeypatch):
    with StubProvider(dim=16, answer_dim=8) as stub:
        with pytest.raises(DimensionMismatch, match=r"dim=16"):
            encoder(stub, remote_settings).encode_items(["x"])
        monkeypatch.setenv("STUB_API_KEY", "wrong-key-123")
        with pytest.raises(EncoderError, match="STUB_API_KEY") as refused:
            encoder(stub, remote_settings).encode_items(["x"])
    assert "wrong-key-123" not in str(refused.value)  # the stub echoes the header; the message must not


# --- token counting ----------------------------------------------------------------------------


def test_over_long_text_is_truncated_and_reported_or_refused(remote_settings):
    with StubProvider() as stub:
        enc = encoder(stub, remote_settings, max_tokens=12)
        short, long, accents = enc.encode_items(["fits", "this text is far too long", "é" * 7])
        assert (short.info["tokens"], short.info["truncated_tokens"], short.info["token_count"]) == (6, 0, ESTIMATE)
        assert long.ok and long.info["tokens"] == 12 and long.info["truncated_tokens"] == 27 - 12
        assert accents.ok and accents.info["tokens"] == 12  # cut at a character boundary: 5 x 2 bytes + 2
        assert sorted(t for c in stub.calls for t in c.texts) == sorted(["fits", "this text ", "é" * 5])
        strict = encoder(stub, remote_settings.model_copy(update={"token_policy": "error"}), max_tokens=12)
        [refused] = strict.encode_items(["this text is far too long"])
        assert isinstance(refused.error, TooManyTokens) and refused.error.tokens == 27
        assert strict.estimate(["fits", "this text is far too long"])["tokens"] == 6  # refused texts cost nothing
        assert enc.estimate(["fits", "this text is far too long"])["tokens"] == 6 + 12


def _tiny_bpe(path: Path) -> Path:
    """A real tiktoken BPE file: every byte, then the merges t+h, th+e."""
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    return path


def test_tiktoken_counts_exactly_where_its_file_is_on_disk(remote_settings, tmp_path):
    config = RemoteModelConfig(name="t", base_url="http://x/v1", model="text-embedding-3-small", dim=4)
    assert counter_for(config, remote_settings.models_config()).method == ESTIMATE  # auto, and no BPE file cached here
    folder = tmp_path / "bpe"
    folder.mkdir()
    _tiny_bpe(folder / "cl100k_base.tiktoken")
    counter = counter_for(config, remote_settings.model_copy(update={"remote_tokenizer_dir": folder}).models_config())
    assert counter.method == "tiktoken:cl100k_base" and counter.exact
    assert counter.count("the the") == 3  # "the", " ", "the" (no " t" merge)
    assert counter.count("éé") == 4  # two bytes each, no merges
    text, info = counter.fit("the the the", 3, "truncate", "t")
    assert (text, info["tokens"], info["truncated_tokens"], info["token_count"]) == ("the the", 3, 2, counter.method)
    explicit = config.model_copy(update={"tokenizer": str(folder / "cl100k_base.tiktoken")})
    assert counter_for(explicit, remote_settings.models_config()).count("the") == 1
    with pytest.raises(ModelNotAvailable, match="o200k_base"):
        counter_for(config.model_copy(update={"tokenizer": "o200k_base"}), remote_settings.models_config())


def test_the_estimate_never_undercounts_a_byte_level_tokenizer(tmp_path):
    config = RemoteModelConfig(name="t", base_url="http://x", model="m", dim=4, tokenizer="estimate")
    estimate = counter_for(config, Settings().models_config())
    exact = tiktoken_counter(_tiny_bpe(tmp_path / "tiny.tiktoken"), "tiny")  # a real BPE: at most a token a byte

    @given(st.text(min_size=1, max_size=200))
    def check(text: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return
        assert estimate.count(text) >= exact.count(text) + 2
        assert estimate.count(text) >= stub_tokens(text)

    check()


# --- costs -------------------------------------------------------------------------------------


def test_prices_come_from_the_table_configuration_and_the_model(remote_settings):
    small = remote_config("openai:text-embedding-3-small", remote_settings.models_config())
    large = remote_config("openai:text-embedding-3-large", remote_settings.models_config())
    cohere = remote_config("cohere:embed-english-v3.0", remote_settings.models_config())
    assert [price_for(c, remote_settings.models_config()) for c in (small, large, cohere)] == [0.02, 0.13, 0.10]  # type: ignore[arg-type]
    assert remote_settings.remote_price("text-embedding-ada-002") == 0.10
    cheaper = remote_settings.model_copy(update={"remote_prices": {"text-embedding-3-small": 0.01}})
    assert price_for(small, cheaper.models_config()) == 0.01  # type: ignore[arg-type]
    assert price_for(small.model_copy(update={"usd_per_million_tokens": 5.0}), cheaper.models_config()) == 5.0  # type: ignore[union-attr]


def test_costs_are_tracked_per_batch_and_in_total(remote_settings):
    with StubProvider() as stub:
        enc = encoder(stub, remote_settings, usd_per_million_tokens=2000.0, max_inputs=4)
        first = enc.encode_items([f"batch one {i}" for i in range(10)])
        enc.encode_items(["batch two"])
    one, two = enc.meter.batches[-2], enc.meter.batches[-1]
    billed_one = sum(stub_tokens(f"batch one {i}") for i in range(10))
    assert (one.calls, one.inputs, one.tokens_billed) == (3, 10, billed_one)
    assert one.usd == pytest.approx(billed_one * 2000.0 / 1e6)
    assert first[0].info["batch_tokens"] == billed_one and first[0].info["batch_usd"] == pytest.approx(one.usd)
    assert (two.calls, two.tokens_billed) == (1, stub_tokens("batch two"))
    total = enc.meter.total
    assert total.tokens_billed == one.tokens_billed + two.tokens_billed
    assert math.isclose(total.usd, one.usd + two.usd)


def test_the_command_line_lists_remote_models_and_has_nothing_to_pull_for_them(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from mmembed import config
    from mmembed.cli import app

    monkeypatch.setenv("MMEMBED_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MMEMBED_REMOTE_MODELS", '[{"name": "team", "base_url": "http://x/v1", "model": "m", "dim": 8}]')
    monkeypatch.setenv("COLUMNS", "250")
    config.get_settings.cache_clear()
    try:
        pulled = CliRunner().invoke(app, ["models", "pull", "openai:text-embedding-3-small", "team"])
        listed = CliRunner().invoke(app, ["models", "list"])
    finally:
        config.get_settings.cache_clear()
    assert pulled.exit_code == 0, pulled.output
    assert "nothing to pull, it calls https://api.openai.com/v1/embeddings" in " ".join(pulled.output.split())
    assert "nothing to pull, it calls http://x/v1/embeddings" in " ".join(pulled.output.split())
    assert not (tmp_path / "models").exists()
    assert listed.exit_code == 0 and "remote (openai)" in listed.output and "openai:MODEL" in listed.output
