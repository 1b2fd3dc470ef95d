"""Which vectors an item gets and which model encodes a query, from the models' own
descriptions (the ModelInfo that LoadedModel.describe returns for the offline models)."""

from __future__ import annotations

import pytest

from mmembed.contracts import EncoderInfo, ModelInfo
from mmembed.store.spaces import RoutingError, item_encoders, layout, plan_query, transcriber


def _model(name: str, space: str, family: str, dims: dict[str, int], transcribes: bool = False) -> ModelInfo:
    encoders = {m: EncoderInfo(f"{name}.{m}", d, {}) for m, d in dims.items()}
    return ModelInfo(
        name, space, family, "cpu", "float32", encoders, transcribes=transcribes, cacheable=not transcribes
    )


DESCRIBED = {
    "demo-clip": _model("demo-clip", "demo-clip", "open_clip", {"image": 128, "text": 128}),
    "all-MiniLM-L6-v2": _model("all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "sentence_transformers", {"text": 384}),
    "whisper-base": _model("whisper-base", "all-MiniLM-L6-v2", "whisper", {"audio": 384}, transcribes=True),
    "bind": _model("bind", "demo-clip", "bind", {"audio": 128, "image": 128, "text": 128}),
}
VECTORS = layout(DESCRIBED)


def test_each_space_is_stored_once_and_every_audio_model_gets_its_vector() -> None:
    assert VECTORS == {
        "demo-clip.image": 128,
        "demo-clip.text": 128,
        "all-MiniLM-L6-v2.text": 384,
        "whisper-base.audio": 384,
        "bind.audio": 128,
    }


def test_items_are_encoded_by_their_own_towers_and_captions_by_every_text_tower() -> None:
    text_towers = [("demo-clip", "text"), ("all-MiniLM-L6-v2", "text")]
    assert item_encoders(DESCRIBED, "image") == [("demo-clip", "image"), *text_towers]
    assert item_encoders(DESCRIBED, "audio")[:2] == [("whisper-base", "audio"), ("bind", "audio")]


def test_queries_are_encoded_into_the_space_of_the_vector_they_search() -> None:
    text = plan_query(DESCRIBED, VECTORS, "text", None, None, "direct")
    assert (text.vector, text.model, text.modality) == ("demo-clip.image", "demo-clip", "text")
    speech = plan_query(DESCRIBED, VECTORS, "audio", "demo-clip.image", None, "direct")
    assert (speech.model, speech.modality, speech.transcribe_with) == ("bind", "audio", None)
    heard = plan_query(DESCRIBED, VECTORS, "audio", "demo-clip.image", None, "transcript")
    assert (heard.model, heard.modality, heard.transcribe_with) == ("demo-clip", "text", "whisper-base")
    to_audio = plan_query(DESCRIBED, VECTORS, "text", "whisper-base.audio", None, "direct")
    assert (to_audio.model, to_audio.modality) == ("all-MiniLM-L6-v2", "text")


def test_the_transcript_route_goes_through_whichever_model_transcribes() -> None:
    assert transcriber(DESCRIBED) == "whisper-base"
    assert transcriber({k: v for k, v in DESCRIBED.items() if k != "whisper-base"}) is None
    with pytest.raises(RoutingError, match="needs a whisper model"):
        plan_query(DESCRIBED, VECTORS, "audio", "demo-clip.image", "bind", "transcript")


@pytest.mark.parametrize(
    ("modality", "vector", "via", "route", "message"),
    [
        ("text", "ViT-B-32.image", None, "direct", "no vector 'ViT-B-32.image'"),
        ("text", "demo-clip.image", "all-MiniLM-L6-v2", "direct", "into the space of 'demo-clip.image'"),
        ("audio", "all-MiniLM-L6-v2.text", "bind", "direct", "bind"),
        ("text", None, None, "transcript", "for audio queries"),
        ("image", None, "nope", "direct", "'nope' is not served"),
    ],
)
def test_queries_no_served_model_can_encode_say_why(modality, vector, via, route, message) -> None:
    with pytest.raises(RoutingError, match=message):
        plan_query(DESCRIBED, VECTORS, modality, vector, via, route)
