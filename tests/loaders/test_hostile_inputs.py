"""Every hostile image and clip of tests/hostile.py is decoded or refused with one of its
expected codes: never another exception, never a hang, and bombs stay cheap in memory."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile import DECODES, Hostile, encode_audio, hls_playlist, hostile_audio, hostile_images, tone
from PIL import Image

from mmembed.loaders.audio import SAMPLE_RATE, AudioClip, AudioDecodeError, AudioLimits, decode_audio
from mmembed.loaders.images import ImageDecodeError, decode_image

DEADLINE_S = 30.0  # ffmpeg on a loaded CI box included; a hang runs forever
BOMB_BYTES = 200_000_000
IMAGES, AUDIO = hostile_images(), hostile_audio()


def within(seconds: float, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a thread: its result or its exception, or a test failure if it is
    still running after ``seconds`` (the thread cannot be killed; it is a daemon)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"decode-{fn.__name__}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"{fn.__name__} still running after {seconds:g} s: a hang")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def outcome_of(h: Hostile, decode: Callable[[bytes], Any], error: type[Exception]) -> tuple[str, Any]:
    """(DECODES, result) or (code, exception); any other exception fails the test as is.
    Bombs are decoded under tracemalloc: Python and numpy allocations must stay bounded."""
    if h.bomb:
        tracemalloc.start()
    try:
        return DECODES, within(DEADLINE_S, decode, h.data)
    except error as exc:
        return exc.code, exc  # type: ignore[attr-defined]
    finally:
        if h.bomb:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < BOMB_BYTES, f"{h.name}: decoding allocated {peak / 1e6:.0f} MB"


@pytest.mark.parametrize("h", IMAGES, ids=[h.name for h in IMAGES])
def test_hostile_image(h: Hostile) -> None:
    code, result = outcome_of(h, decode_image, ImageDecodeError)
    assert code in h.codes, f"{h.name}: got {code!r} ({result}), expected one of {sorted(h.codes)}"
    if code == DECODES:
        assert isinstance(result, Image.Image) and result.mode == "RGB"
        assert result.width >= 1 and result.height >= 1
        assert np.asarray(result).shape == (result.height, result.width, 3)


@pytest.mark.parametrize("h", AUDIO, ids=[h.name for h in AUDIO])
def test_hostile_audio(h: Hostile) -> None:
    code, result = outcome_of(h, decode_audio, AudioDecodeError)
    assert code in h.codes, f"{h.name}: got {code!r} ({result}), expected one of {sorted(h.codes)}"
    if code == DECODES:
        assert isinstance(result, AudioClip)
        samples = result.samples
        assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size > 0
        assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
        assert result.seconds <= AudioLimits().max_seconds


def test_the_corpus_covers_what_it_claims() -> None:
    """Guard against a corpus that silently lost its teeth."""
    for corpus in (IMAGES, AUDIO):
        names = [h.name for h in corpus]
        assert len(names) == len(set(names))
        assert sum(h.must_decode for h in corpus) >= 3 and sum(h.bomb for h in corpus) >= 5
        assert all(isinstance(h.data, bytes) and h.codes for h in corpus)
    assert all(len(h.data) < 20_000_000 for h in IMAGES + AUDIO)
    assert max(len(h.data) for h in IMAGES if h.bomb) < 20_000


def test_ffmpeg_does_not_follow_a_playlist_to_local_files(tmp_path: Path) -> None:
    """An ID3 tag then an HLS playlist sniffs as mp3; ffmpeg left to probe it would decode the
    server's own files named in it and embed them as the uploader's clip."""
    secret = tmp_path / "secret.mp3"
    secret.write_bytes(encode_audio(tone(1.0), SAMPLE_RATE, "MP3", "MPEG_LAYER_III"))
    assert decode_audio(secret).seconds > 0.9  # the file itself is readable audio
    for name in (str(secret), f"file:{secret}"):
        with pytest.raises(AudioDecodeError) as info:
            within(DEADLINE_S, decode_audio, hls_playlist(name))
        assert info.value.code == "corrupt_audio"


_CHILD = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from hostile import hostile_audio, hostile_images, encode_image, noisy_image, wav_i16, tone
from mmembed.loaders.audio import AudioDecodeError, decode_audio
from mmembed.loaders.images import ImageDecodeError, decode_image

def status(field):  # kB; VmHWM is this process's peak resident set (ru_maxrss survives exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":")) * 1024

bombs = [(decode_image, h) for h in hostile_images() if h.bomb] + [(decode_audio, h) for h in hostile_audio() if h.bomb]
decode_image(encode_image(noisy_image(), "PNG")), decode_audio(wav_i16(tone(0.5)[:, 0], 16000))  # codecs loaded
try:
    open("/proc/self/clear_refs", "w").write("5")  # peak := now, so building the corpus does not count
except OSError:
    pass  # the peak then includes building the corpus: an overestimate, never an underestimate
start = status("VmRSS")
codes = {}
for decode, h in bombs:
    try:
        decode(h.data)
        codes[h.name] = "decodes"
    except (ImageDecodeError, AudioDecodeError) as exc:
        codes[h.name] = exc.code
print(json.dumps({"grew": status("VmHWM") - start, "codes": codes}))
"""


def test_bombs_stay_bounded_in_resident_memory() -> None:
    """tracemalloc sees Python and numpy; Pillow and libsndfile allocate in C. A fresh process
    decodes every bomb: its peak resident set may not grow by more than 200 MB (Linux)."""
    tests, root = Path(__file__).parents[1], Path(__file__).parents[2]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tests), str(root)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr[-2000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["grew"] < BOMB_BYTES, f"decoding the bombs grew the resident set by {report['grew'] / 1e6:.0f} MB"
    expected = {h.name: h.codes for h in IMAGES + AUDIO if h.bomb}
    assert report["codes"].keys() == expected.keys()
    assert all(code in expected[name] for name, code in report["codes"].items()), report["codes"]
