"""Audio decoding on real speech (espeak-ng) in every container ffmpeg writes, and every
kind of bad clip the issue lists."""

from __future__ import annotations

import io
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import pytest

from mmembed.demo.speech import espeak_wav, speak
from mmembed.loaders.audio import SAMPLE_RATE, AudioClip, AudioDecodeError, AudioLimits, Pcm, decode_audio, sniff_format


@pytest.fixture(scope="module")
def speech_wav() -> bytes:
    return espeak_wav("the quick brown fox jumps over the lazy dog")


def ffmpeg_convert(data: bytes, fmt: str, *args: str) -> bytes:
    """Through a file: MP4 containers need a seekable output."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        subprocess.run(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", "pipe:0", *args, "-f", fmt, str(out)],
            input=data,
            capture_output=True,
            check=True,
        )
        return out.read_bytes()


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1 if samples.ndim == 1 else samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())
    return buf.getvalue()


def code_of(source: object, limits: AudioLimits = AudioLimits()) -> str:
    with pytest.raises(AudioDecodeError) as info:
        decode_audio(source, limits)  # type: ignore[arg-type]
    return info.value.code


@pytest.mark.parametrize(
    ("fmt", "args", "sniffed"),
    [
        ("wav", (), "wav"),
        ("flac", (), "flac"),
        ("mp3", ("-b:a", "64k"), "mp3"),
        ("ogg", ("-c:a", "libvorbis"), "ogg"),
        ("ipod", ("-c:a", "aac", "-movflags", "+faststart"), "m4a"),
    ],
)
def test_every_container_decodes_to_the_same_16k_mono_speech(speech_wav: bytes, fmt: str, args: tuple, sniffed: str):
    reference = decode_audio(speech_wav)
    data = speech_wav if fmt == "wav" else ffmpeg_convert(speech_wav, fmt, *args)
    assert sniff_format(data) == sniffed
    clip = decode_audio(data)
    assert clip.samples.dtype == np.float32
    # espeak writes 22.05 kHz: everything is resampled to 16 kHz, codec padding aside.
    assert abs(clip.seconds - reference.seconds) < 0.15
    assert 1.5 < reference.seconds < 5
    n = min(len(clip.samples), len(reference.samples))
    lag = int(np.argmax(np.correlate(clip.samples[:n], reference.samples[: n // 2], "valid")))
    aligned = clip.samples[lag : lag + n // 2]
    assert np.corrcoef(aligned, reference.samples[: n // 2])[0, 1] > 0.9


def test_a_file_path_decodes(tmp_path, speech_wav: bytes):
    path = tmp_path / "speech.wav"
    path.write_bytes(speech_wav)
    assert decode_audio(path).seconds == pytest.approx(decode_audio(speech_wav).seconds)


def test_odd_sample_rates_and_stereo_are_resampled_and_downmixed():
    t = np.arange(int(1.5 * 44_100)) / 44_100
    tone = (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    stereo = np.stack([tone, tone], axis=1)
    for clip in (decode_audio(Pcm(stereo, 44_100)), decode_audio(wav_bytes(stereo, 44_100))):
        assert clip.seconds == pytest.approx(1.5, abs=0.01)
        expected = 0.5 * np.sin(2 * np.pi * 300 * np.arange(len(clip.samples)) / SAMPLE_RATE)
        assert np.abs(clip.samples[100:-100] - expected[100:-100]).max() < 0.02  # same tone, same level
    eight_k = decode_audio(Pcm((np.sin(np.arange(8000) / 5) * 20000).astype(np.int16), 8000))
    assert eight_k.seconds == pytest.approx(1.0, abs=0.01)
    assert 0.5 < np.abs(eight_k.samples).max() <= 1.0  # int16 scaled to [-1, 1]


def test_16k_mono_float_pcm_passes_through_untouched():
    samples = (0.1 * np.sin(np.arange(16_000) / 7)).astype(np.float32)
    assert np.array_equal(decode_audio(Pcm(samples, SAMPLE_RATE)).samples, samples)


def test_empty_inputs():
    assert code_of(b"") == "empty_audio"
    assert code_of(wav_bytes(np.zeros(0, np.float32), 16_000)) == "empty_audio"
    assert code_of(Pcm(np.zeros(0, np.float32), 16_000)) == "empty_audio"


def test_silence_is_refused_as_silent():
    assert code_of(wav_bytes(np.zeros(32_000, np.float32), 16_000)) == "silent_audio"
    assert code_of(Pcm(np.full(16_000, 1e-5, np.float32), 16_000)) == "silent_audio"


def test_corrupt_bytes_of_a_known_container(speech_wav: bytes):
    assert code_of(b"RIFF" + bytes(range(256)) * 4) == "corrupt_audio"
    flac = ffmpeg_convert(speech_wav, "flac")
    assert code_of(flac[:60] + b"\x00" * 5000) == "corrupt_audio"


def test_unsupported_formats_are_named():
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    for data in (png.getvalue(), b"hello, this is text", np.random.default_rng(0).bytes(4000)):
        with pytest.raises(AudioDecodeError, match="supported: wav, flac, mp3") as info:
            decode_audio(data)
        assert info.value.code == "unsupported_format"


def test_over_long_clips_are_refused_without_decoding_them_whole():
    limits = AudioLimits(max_seconds=10)
    noise = np.random.default_rng(0).normal(0, 0.1, 16_000 * 60).astype(np.float32)
    assert code_of(Pcm(noise, 16_000), limits) == "audio_too_long"
    assert code_of(wav_bytes(noise, 16_000), limits) == "audio_too_long"
    assert decode_audio(wav_bytes(noise[: 16_000 * 9], 16_000), limits).seconds == pytest.approx(9.0)


def test_too_many_bytes_and_bad_pcm():
    assert code_of(b"RIFF" + b"\x00" * 2000, AudioLimits(max_bytes=1000)) == "audio_too_large"
    assert code_of(Pcm(np.array([0.1, np.nan, 0.2], np.float32), 16_000)) == "invalid_audio"
    assert code_of(Pcm(np.zeros((2, 2, 2), np.float32), 16_000)) == "invalid_audio"
    assert code_of(Pcm(np.ones(100, np.float32), 3)) == "invalid_audio"


def test_speak_adds_lead_in_and_noise_only_when_asked():
    import random

    plain = speak("a red circle")
    varied = speak("a red circle", rng=random.Random(3))
    assert isinstance(plain, AudioClip) and plain.seconds > 0.5
    assert varied.seconds >= plain.seconds
