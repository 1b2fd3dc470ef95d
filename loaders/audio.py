"""Decoding untrusted audio into 16 kHz mono float32, one typed error per bad clip.

WAV, FLAC, OGG, MP3 and AIFF decode in-process with libsndfile (soundfile); M4A/AAC,
WebM and AMR, and anything libsndfile refuses, go through ffmpeg, the decoder
openai-whisper itself uses. Spawning ffmpeg costs about 0.1 s a clip, as much as the
bind encoder's forward pass on a spoken query, hence the in-process path for the
common formats. Other sample rates are resampled (polyphase, scipy) and channels
averaged. The container is sniffed first, so "this is not a format we read" and "this
is a damaged file of a format we read" are different errors.

Decoding stops just past the duration limit: an endless or enormous stream costs at
most the limit's worth of work before it is refused.
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000

# Leading bytes of the containers ffmpeg reads for us; anything else is refused unread.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"RIFF", "wav"),
    (0, b"fLaC", "flac"),
    (0, b"OggS", "ogg"),
    (0, b"ID3", "mp3"),
    (4, b"ftyp", "m4a"),
    (0, b"\x1a\x45\xdf\xa3", "webm"),
    (0, b"FORM", "aiff"),
    (0, b"#!AMR", "amr"),
)
SUPPORTED_FORMATS = ("wav", "flac", "mp3", "ogg", "m4a", "webm", "aiff", "amr", "aac")
_LIBSNDFILE_FORMATS = {"wav", "flac", "ogg", "mp3", "aiff"}
# The demuxers ffmpeg may pick for those (it probes the content, not the name): an ID3 tag
# followed by an HLS playlist would otherwise make it read local files named in the playlist.
_FFMPEG_DEMUXERS = "wav,flac,ogg,mp3,aac,mov,mp4,m4a,matroska,webm,aiff,amr,amrnb,amrwb,avi"
# The highest sample rate a header may state (the same bound as for raw PCM): the cost of
# decoding and resampling grows with it, and no recording needs more.
_MAX_RATE = 768_000


class AudioDecodeError(ValueError):
    """A bad clip. ``code`` is stable for APIs and dead-letter records."""

    code = "invalid_audio"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.code


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = 600.0
    max_bytes: int = 100_000_000
    # Below this peak level (about -60 dBFS) a clip is treated as silence.
    silence_peak: float = 1e-3


@dataclass(frozen=True)
class Pcm:
    """Raw samples from the caller: shape (n,) mono or (n, channels); any float or int dtype."""

    samples: np.ndarray
    sample_rate: int


@dataclass(frozen=True)
class AudioClip:
    """Decoded audio, ready for a model: 16 kHz mono float32 in [-1, 1]."""

    samples: np.ndarray
    source_rate: int | None = None
    source_channels: int | None = None

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


AudioInput = bytes | str | Path | Pcm | AudioClip


def sniff_format(data: bytes) -> str | None:
    for offset, magic, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:  # MPEG audio frame sync
        return "aac" if data[1] & 0x06 == 0 else "mp3"
    return None


def decode_audio(source: AudioInput, limits: AudioLimits = AudioLimits()) -> AudioClip:
    """Bytes, a file path, raw PCM or an already decoded clip -> AudioClip, or
    AudioDecodeError with a code: empty_audio, audio_too_large, unsupported_format,
    corrupt_audio, audio_too_long, silent_audio."""
    if isinstance(source, AudioClip):
        clip = source
    elif isinstance(source, Pcm):
        clip = _decode_pcm(source, limits)
    else:
        data = Path(source).expanduser().read_bytes() if isinstance(source, str | Path) else source
        clip = _decode_bytes(data, limits)
    return check_clip(clip, limits)


def check_clip(clip: AudioClip, limits: AudioLimits) -> AudioClip:
    if clip.samples.size == 0:
        raise AudioDecodeError("audio has no samples", "empty_audio")
    if clip.seconds > limits.max_seconds:
        raise AudioDecodeError(
            f"audio is longer than the limit of {limits.max_seconds:g} s (decoding stopped there)", "audio_too_long"
        )
    peak = float(np.abs(clip.samples).max())
    if not math.isfinite(peak):  # NaN/inf float samples: a damaged file, and NaN vectors downstream
        raise AudioDecodeError("audio contains NaN or infinite samples", "corrupt_audio")
    if peak < limits.silence_peak:
        raise AudioDecodeError("audio is silent (peak below -60 dBFS): there is no speech to encode", "silent_audio")
    return clip


def _decode_bytes(data: bytes, limits: AudioLimits) -> AudioClip:
    if not data:
        raise AudioDecodeError("audio is empty (0 bytes)", "empty_audio")
    if len(data) > limits.max_bytes:
        raise AudioDecodeError(f"audio is {len(data)} bytes, over the {limits.max_bytes}-byte limit", "audio_too_large")
    kind = sniff_format(data)
    if kind is None:
        raise AudioDecodeError(
            f"not a supported audio format (supported: {', '.join(SUPPORTED_FORMATS)})", "unsupported_format"
        )
    if kind in _LIBSNDFILE_FORMATS:
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                rate, channels = f.samplerate, f.channels
                if rate > _MAX_RATE:
                    raise AudioDecodeError(f"the header states a sample rate of {rate} Hz", "corrupt_audio")
                mono = _read_mono(f, int((limits.max_seconds + 0.5) * rate))
            return AudioClip(to_16k_mono(mono, rate), rate, channels)
        except AudioDecodeError:
            raise
        except (sf.LibsndfileError, RuntimeError, ValueError):
            pass  # ffmpeg reads more variants (odd WAV codecs, damaged headers) or names the damage
    # A file, not a pipe: MP4/M4A keep their index at the end and need a seekable input.
    with tempfile.NamedTemporaryFile(suffix=f".{kind}") as f:
        f.write(data)
        f.flush()
        samples = _ffmpeg(f.name, limits, kind)
    return AudioClip(samples)


def _read_mono(f: sf.SoundFile, frames: int) -> np.ndarray:
    """Up to ``frames`` frames as (n, 1) float32, mixed down block by block: memory follows
    the duration limit at one channel, not what the header claims (length unknown, 8 channels
    at 655 kHz) nor a full-length buffer allocated up front."""
    blocks: list[np.ndarray] = []
    while frames > 0:
        block = f.read(min(frames, 1 << 16), dtype="float32", always_2d=True)
        if not len(block):
            break
        blocks.append(block.mean(axis=1) if block.shape[1] > 1 else block[:, 0])
        frames -= len(block)
    return np.concatenate(blocks)[:, None] if blocks else np.zeros((0, 1), np.float32)


def _decode_pcm(pcm: Pcm, limits: AudioLimits) -> AudioClip:
    samples = np.asarray(pcm.samples)
    if samples.ndim not in (1, 2):
        raise AudioDecodeError(f"PCM must have shape (n,) or (n, channels), got {samples.shape}", "invalid_audio")
    if pcm.sample_rate < 1000 or pcm.sample_rate > _MAX_RATE:
        raise AudioDecodeError(f"sample rate {pcm.sample_rate} Hz is not plausible", "invalid_audio")
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    if samples.size == 0 or channels == 0:
        raise AudioDecodeError("audio has no samples", "empty_audio")
    if np.issubdtype(samples.dtype, np.integer):
        samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
    samples = samples.astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise AudioDecodeError("PCM contains NaN or infinite samples", "invalid_audio")
    if samples.shape[0] / pcm.sample_rate > limits.max_seconds:
        raise AudioDecodeError(f"audio is longer than the limit of {limits.max_seconds:g} s", "audio_too_long")
    return AudioClip(to_16k_mono(samples.reshape(len(samples), channels), pcm.sample_rate), pcm.sample_rate, channels)


def to_16k_mono(samples: np.ndarray, rate: int) -> np.ndarray:
    """(frames, channels) float32 at ``rate`` -> (frames',) float32 at 16 kHz."""
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if rate != SAMPLE_RATE and len(mono):
        g = math.gcd(rate, SAMPLE_RATE)
        up, down = SAMPLE_RATE // g, rate // g
        if max(up, down) > 1000:
            # An odd rate (767999 Hz): resample_poly's filter has 20 * max(up, down) taps, hundreds
            # of MB and seconds for a 40 KB file. The nearest simple ratio is off by < 1e-5.
            ratio = Fraction(up, down).limit_denominator(1000)
            up, down = ratio.numerator, ratio.denominator
        mono = resample_poly(mono, up, down)
    return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)


def _ffmpeg(path: str, limits: AudioLimits, kind: str) -> np.ndarray:
    """Decode with ffmpeg to 16 kHz mono s16, stopping just past the duration limit."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("ffmpeg is not installed; audio needs it (apt-get install ffmpeg)")
    output = ["-t", f"{limits.max_seconds + 0.5:.3f}", "-f", "s16le", "-ac", "1", "-ar", str(SAMPLE_RATE), "pipe:1"]
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "0"]
    cmd += ["-protocol_whitelist", "file", "-format_whitelist", _FFMPEG_DEMUXERS, "-i", path, *output]
    try:
        run = subprocess.run(cmd, capture_output=True, timeout=60 + limits.max_seconds / 10, check=False)
    except subprocess.TimeoutExpired as exc:
        message = f"cannot decode {kind} audio: ffmpeg took over {exc.timeout:g} s"
        raise AudioDecodeError(message, "corrupt_audio") from exc
    if run.returncode != 0:
        reason = run.stderr.decode(errors="replace").strip().splitlines()
        detail = reason[-1] if reason else f"ffmpeg exited with {run.returncode}"
        raise AudioDecodeError(f"cannot decode {kind} audio: {detail}", "corrupt_audio")
    return np.frombuffer(run.stdout, np.int16).astype(np.float32) / 32768.0
