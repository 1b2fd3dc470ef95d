"""Real speech for training and tests: espeak-ng saying known words.

No speech dataset ships offline, so the project synthesises one. Voices are an accent
(espeak-ng's English dialects) plus a variant (timbre), at a speed and pitch. Training
and evaluation draw from disjoint accents and variants, so the held-out figures measure
voices the bind head has never heard.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np

from mmembed.loaders.audio import AudioClip, decode_audio

TRAIN_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "klatt", "klatt2", "croak", "Alex", "Andy")
HELD_OUT_ACCENTS = ("en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
HELD_OUT_VARIANTS = ("m6", "m7", "f4", "f5", "klatt3", "Annie")


@dataclass(frozen=True)
class Voice:
    accent: str = "en-us"
    variant: str = ""
    speed: int = 160  # words per minute
    pitch: int = 50  # 0-99

    def espeak_args(self) -> list[str]:
        name = f"{self.accent}+{self.variant}" if self.variant else self.accent
        return ["-v", name, "-s", str(self.speed), "-p", str(self.pitch)]


DEFAULT_VOICE = Voice()


def random_voice(rng: random.Random, held_out: bool) -> Voice:
    accents, variants = (HELD_OUT_ACCENTS, HELD_OUT_VARIANTS) if held_out else (TRAIN_ACCENTS, TRAIN_VARIANTS)
    return Voice(rng.choice(accents), rng.choice(variants), rng.randint(130, 195), rng.randint(30, 70))


def espeak_wav(text: str, voice: Voice = DEFAULT_VOICE) -> bytes:
    """WAV bytes (22.05 kHz mono) of espeak-ng saying ``text``."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    run = subprocess.run([exe, *voice.espeak_args(), "--stdout", text], capture_output=True, check=True, timeout=60)
    return run.stdout


def speak(text: str, voice: Voice = DEFAULT_VOICE, rng: random.Random | None = None) -> AudioClip:
    """16 kHz mono speech. With ``rng``, also a random lead-in of silence and a little
    noise, as a microphone would add."""
    clip = decode_audio(espeak_wav(text, voice))
    if rng is None:
        return clip
    lead = np.zeros(int(rng.uniform(0.0, 0.6) * 16_000), dtype=np.float32)
    samples = np.concatenate([lead, clip.samples])
    if rng.random() < 0.4:
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(0.002, 0.02), samples.shape)
        samples = np.clip(samples + noise.astype(np.float32), -1, 1)
    return AudioClip(samples.astype(np.float32))


# Plain everyday sentences, never used in any training here: the Whisper transcription
# check and the audio benchmark speak these.
PLAIN_SENTENCES = (
    "The weather is nice today and the sun is shining.",
    "Please send me the report before the meeting tomorrow.",
    "My brother lives in a small house near the river.",
    "We are going to the store to buy some bread and milk.",
    "The children played football in the park after school.",
    "Can you tell me how to get to the train station?",
    "She reads a new book every week.",
    "The coffee in this restaurant is very good.",
    "I will call you when I get home tonight.",
    "The quick brown fox jumps over the lazy dog.",
)
