"""The shipped bind head: audio straight into demo-clip's space, on voices and captions
it never trained on."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mmembed.config import Settings
from mmembed.demo import world
from mmembed.demo.speech import random_voice, speak
from mmembed.encoders import LoadedModel, Modality, load
from mmembed.loaders.audio import AudioClip, Pcm


@pytest.fixture(scope="module")
def bind(settings: Settings) -> LoadedModel:
    return load("bind", settings.models_config())


def test_bind_is_audio_plus_the_frozen_clip_it_binds_to(bind: LoadedModel, demo_clip: LoadedModel):
    assert {m: e.dim for m, e in bind.encoders.items()} == {"audio": 128, "text": 128, "image": 128}
    assert bind.encoder(Modality.AUDIO).name == "bind.audio"
    text = "a small red circle in the top left"
    [ours] = bind.encoder(Modality.TEXT).encode_items([text])
    [theirs] = demo_clip.encoder(Modality.TEXT).encode_items([text])
    assert np.allclose(ours.vector, theirs.vector, atol=1e-6)  # the same frozen space, not a copy that drifted


@pytest.mark.slow
def test_held_out_voices_saying_held_out_captions_find_their_scenes(bind: LoadedModel):
    pool = world.eval_set(200)  # the first 200 of the report's held-out gallery: never trained on
    images = bind.encoder(Modality.IMAGE).encode_items([im for _, im in pool])
    gallery = np.stack([r.vector for r in images])
    rng = random.Random("bind-test")
    queries = [s for s, _ in pool[:40]]
    clips = [speak(s.caption(), random_voice(rng, held_out=True), rng) for s in queries]
    vectors = np.stack([r.vector for r in bind.encoder(Modality.AUDIO).encode_items(clips)])
    top5 = np.argsort(-(vectors @ gallery.T), axis=1)[:, :5]
    hits = [any(pool[j][0].signature == q.signature for j in top5[i]) for i, q in enumerate(queries)]
    assert np.mean(hits) >= 0.7


def test_a_clips_vector_does_not_depend_on_its_batch(bind: LoadedModel):
    audio = bind.encoder(Modality.AUDIO)
    clip = speak("a large blue square in the center")
    [alone] = audio.encode_items([clip])
    batch = audio.encode_items([speak("a red star and a green cross, and a small white circle"), clip, speak("red")])
    assert np.allclose(alone.vector, batch[1].vector, atol=1e-4)
    assert not np.allclose(batch[0].vector, batch[1].vector, atol=1e-2)


def test_long_clips_are_windowed_and_bad_clips_fail_alone(bind: LoadedModel):
    audio = bind.encoder(Modality.AUDIO)
    said = speak("a yellow triangle in the bottom right").samples
    long_clip = AudioClip(np.concatenate([said, np.zeros(16_000 * 35, np.float32), said]))
    results = audio.encode_items([long_clip, b"", Pcm(np.zeros(8000, np.float32), 16_000), b"OggS" + b"\x00" * 100])
    assert results[0].ok and results[0].info["seconds"] > 35
    assert abs(float(np.linalg.norm(results[0].vector)) - 1) < 1e-4
    assert [r.error.code for r in results[1:]] == ["empty_audio", "silent_audio", "corrupt_audio"]
