"""The Whisper speech encoder on real espeak-ng speech: transcripts, timestamps, the
transcript's embedding, batching, windowing and bad clips."""

from __future__ import annotations

import numpy as np
import pytest

from mmembed.config import Settings
from mmembed.demo.metrics import word_error_rate
from mmembed.demo.speech import PLAIN_SENTENCES, espeak_wav, speak
from mmembed.encoders import LoadedModel, Modality, load
from mmembed.loaders.audio import AudioClip, Pcm

pytestmark = pytest.mark.slow  # real Whisper base beam searches: about a minute each on 2 cores


def test_transcribes_ten_held_out_sentences_within_the_error_budget(whisper_base: LoadedModel, minilm: LoadedModel):
    speech = whisper_base.encoder(Modality.AUDIO)
    clips = [speak(s) for s in PLAIN_SENTENCES]
    results = speech.encode_items(clips)
    transcripts = [r.info["transcript"] for r in results]
    assert word_error_rate(PLAIN_SENTENCES, transcripts) <= 0.2, transcripts
    text = minilm.encoder(Modality.TEXT)
    expected = text.encode([text.preprocess(t) for t in transcripts])
    for clip, result, vector in zip(clips, results, expected, strict=True):
        assert result.ok and result.info["language"] == "en"
        assert np.allclose(result.vector, vector, atol=1e-5)  # the vector is the transcript's MiniLM embedding
        segments = result.info["segments"]
        assert segments and all(0 <= s["start"] < s["end"] <= clip.seconds + 0.5 for s in segments)
        assert result.info["seconds"] == pytest.approx(clip.seconds, abs=1e-3)


def test_a_batch_decodes_together_with_the_same_result_as_one_at_a_time(whisper_base: LoadedModel):
    speech = whisper_base.encoder(Modality.AUDIO)
    clips = [speak(s).samples for s in PLAIN_SENTENCES[:3]]
    together = speech.transcribe(clips)
    alone = [speech.transcribe([c])[0] for c in clips]
    assert [t.text for t in together] == [t.text for t in alone]


def test_bad_clips_get_their_own_error_and_the_good_ones_still_transcribe(whisper_base: LoadedModel):
    speech = whisper_base.encoder(Modality.AUDIO)
    good = espeak_wav("the coffee in this restaurant is very good")
    items = [good, b"", Pcm(np.zeros(16_000, np.float32), 16_000), b"RIFF" + b"\x01" * 3000, b"plain text", good]
    results = speech.encode_items(items)
    assert [r.error.code if r.error else "ok" for r in results] == [
        "ok",
        "empty_audio",
        "silent_audio",
        "corrupt_audio",
        "unsupported_format",
        "ok",
    ]
    assert "restaurant" in results[0].info["transcript"].lower()
    assert np.allclose(results[0].vector, results[5].vector, atol=1e-5)


def test_noise_without_words_is_no_speech(whisper_base: LoadedModel):
    speech = whisper_base.encoder(Modality.AUDIO)
    hum = 0.05 * np.sin(2 * np.pi * 50 * np.arange(3 * 16_000) / 16_000)
    [result] = speech.encode_items([Pcm(hum.astype(np.float32), 16_000)])
    assert result.error is not None and result.error.code == "no_speech"


def test_audio_over_30_seconds_is_windowed(whisper_base: LoadedModel):
    first, second = speak("my brother lives in a small house"), speak("the children played football")
    gap = np.zeros(int((31.0 - first.seconds) * 16_000), np.float32)
    clip = AudioClip(np.concatenate([first.samples, gap, second.samples]))
    [result] = whisper_base.encoder(Modality.AUDIO).encode_items([clip])
    text = result.info["transcript"].lower()
    assert "brother" in text and "football" in text
    late = [s for s in result.info["segments"] if "football" in s["text"].lower()]
    assert late and late[0]["start"] >= 30.0


def test_clips_over_the_configured_duration_are_refused(settings: Settings):
    short = load("whisper-base", settings.model_copy(update={"max_audio_seconds": 5.0}).models_config())
    long_clip = AudioClip(np.concatenate([speak("hello there").samples, np.full(16_000 * 6, 0.01, np.float32)]))
    [result] = short.encoder(Modality.AUDIO).encode_items([long_clip])
    assert result.error is not None and result.error.code == "audio_too_long"
