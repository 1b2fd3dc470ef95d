"""Audio throughput: seconds of speech processed per second of wall time, at batch sizes 1 and 8.

Routes:
- ``transcript``: whisper-base transcribes (beam 5, the default) and MiniLM embeds the words;
- ``transcript-greedy``: the same with beam 1, the fast setting (``MMEMBED_WHISPER_BEAM_SIZE=1``);
- ``bind``: Whisper's encoder alone on the clip's own length plus the trained head.

Clips are espeak-ng sentences (2-4 s, the length of a spoken query), already decoded, so
the figures are model time; decoding (``decode_audio`` on the WAV bytes) is reported on its own. Ratios are
against the beam-5 transcript route at the same batch size in this same run.

    python bench/audio_throughput.py [--clips 16] [--out bench/results/audio_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from mmembed.config import Settings
from mmembed.demo.speech import PLAIN_SENTENCES, Voice, espeak_wav
from mmembed.encoders import Encoder, Modality, load
from mmembed.loaders.audio import decode_audio

BATCH_SIZES = (1, 8)


def _speech_seconds_per_s(encoder: Encoder, wavs: list[bytes], batch_size: int) -> float:
    prepared = [encoder.preprocess(w) for w in wavs]
    encoder.encode_prepared(prepared[:batch_size])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(prepared), batch_size):
        results = encoder.encode_prepared(prepared[i : i + batch_size])
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    elapsed = time.perf_counter() - started
    return sum(p.info["seconds"] for p in prepared) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audio_throughput.json")
    args = parser.parse_args()

    voices = (Voice(), Voice("en-gb", "", 150, 45))
    wavs = [
        espeak_wav(PLAIN_SENTENCES[i % len(PLAIN_SENTENCES)], voices[i // len(PLAIN_SENTENCES) % 2])
        for i in range(args.clips)
    ]
    started = time.perf_counter()
    audio_seconds = sum(decode_audio(w).seconds for w in wavs)
    results: dict[str, object] = {
        "clips": args.clips,
        "audio_seconds": round(audio_seconds, 1),
        "decode_speech_seconds_per_s": round(audio_seconds / (time.perf_counter() - started), 1),
    }
    settings = Settings(allow_downloads=False)
    routes = {
        "transcript": ("whisper-base", settings),
        "transcript-greedy": ("whisper-base", settings.model_copy(update={"whisper_beam_size": 1})),
        "bind": ("bind", settings),
    }
    rates: dict[str, float] = {}
    for route, (name, route_settings) in routes.items():
        encoder = load(name, route_settings.models_config()).encoder(Modality.AUDIO)
        for bs in BATCH_SIZES:
            rates[f"{route}@{bs}"] = _speech_seconds_per_s(encoder, wavs, bs)
            print(f"{route:18s} batch {bs}: {rates[f'{route}@{bs}']:7.2f} s of speech per s", flush=True)
    results |= {k: round(v, 2) for k, v in rates.items()}
    for route in routes:
        results[f"{route}_batch8_vs_batch1"] = round(rates[f"{route}@8"] / rates[f"{route}@1"], 2)
        for bs in BATCH_SIZES:
            if route != "transcript":
                results[f"{route}_vs_transcript@{bs}"] = round(rates[f"{route}@{bs}"] / rates[f"transcript@{bs}"], 2)
    results["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
