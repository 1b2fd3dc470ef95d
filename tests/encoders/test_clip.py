"""open_clip models: the shipped demo-clip and the real ViT-B-32 architecture."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmembed.config import Settings
from mmembed.encoders import EmptyInput, InputError, LoadedModel, Modality, TooManyTokens, load
from mmembed.encoders.clip import square_uint8


def _image(colour: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> Image.Image:
    return Image.new("RGB", size, colour)


@pytest.mark.parametrize(("fixture", "dim", "side", "context"), [("demo_clip", 128, 64, 32), ("vit_b32", 512, 224, 77)])
def test_interface_and_limits(request: pytest.FixtureRequest, fixture: str, dim: int, side: int, context: int) -> None:
    model: LoadedModel = request.getfixturevalue(fixture)
    image, text = model.encoder(Modality.IMAGE), model.encoder(Modality.TEXT)
    assert (image.dim, text.dim) == (dim, dim)
    assert image.limits.image_size == side and text.limits.max_tokens == context
    assert image.name == f"{model.spec.name}.image" and text.modality == Modality.TEXT
    vectors = image.encode([image.preprocess(_image((200, 10, 10))), image.preprocess(_image((10, 10, 200)))])
    assert vectors.shape == (2, dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    [tv] = text.encode([text.preprocess("a red circle")])
    assert tv.shape == (dim,) and abs(np.linalg.norm(tv) - 1) < 1e-5


def test_preprocess_is_uint8_centre_crop() -> None:
    wide = Image.new("RGB", (300, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (100, 0, 200, 100))  # red middle third survives the centre crop
    out = square_uint8(wide, 64)
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    assert out[0].float().mean() > 240 and out[2].float().mean() < 15


@pytest.mark.parametrize("size", [(640, 480), (256, 256), (150, 100)])
def test_preprocess_resizes_as_pillow_bicubic_does(size: tuple[int, int]) -> None:
    """torch's antialiased bicubic stands in for Pillow's (0.6-0.7 of its CPU): the same view of the
    image to within 2 levels, shrinking or growing. Bilinear, or bicubic without antialiasing, is
    further off than that on a rendered scene's edges."""
    import random

    from mmembed.demo import world

    rng = random.Random(7)
    image = world.render(world.random_scene(rng), rng, size=max(size)).resize(size)
    scale = 224 / min(size)
    w, h = max(224, round(size[0] * scale)), max(224, round(size[1] * scale))
    left, top = (w - 224) // 2, (h - 224) // 2
    pillow = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))[top : top + 224, left : left + 224]
    ours = square_uint8(image, 224).permute(1, 2, 0).numpy()
    diff = np.abs(ours.astype(int) - pillow.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_batch_result_equals_single_result(demo_clip: LoadedModel) -> None:
    text = demo_clip.encoder("text")
    batch = text.encode_items(["red circle", "a small blue square in the top left", "yellow star"])
    single = text.encode_items(["a small blue square in the top left"])
    np.testing.assert_allclose(batch[1].vector, single[0].vector, atol=1e-5)


def test_bad_items_do_not_fail_the_batch(demo_clip: LoadedModel) -> None:
    results = demo_clip.encoder("text").encode_items(["red circle", "", "   ", None, "blue square"])  # type: ignore[list-item]
    assert [r.ok for r in results] == [True, False, False, False, True]
    assert isinstance(results[1].error, EmptyInput) and results[1].error.code == "empty_input"
    assert isinstance(results[3].error, InputError)
    images = demo_clip.encoder("image").encode_items([_image((1, 2, 3)), "not an image", _image((9, 9, 9))])  # type: ignore[list-item]
    assert [r.ok for r in images] == [True, False, True]
    assert "PIL image" in str(images[1].error)


def test_open_clip_tokenizer_would_truncate_silently_we_report_it(vit_b32: LoadedModel) -> None:
    long_text = "red " * 100
    [result] = vit_b32.encoder("text").encode_items([long_text])
    assert result.info == {"tokens": 77, "truncated_tokens": 102 - 77}
    [short] = vit_b32.encoder("text").encode_items(["red circle"])
    assert short.info == {"tokens": 4, "truncated_tokens": 0}


def test_token_policy_error_counts_tokens(settings: Settings) -> None:
    strict = load("demo-clip", settings.model_copy(update={"token_policy": "error"}).models_config())
    [result] = strict.encoder("text").encode_items(["red " * 40])
    assert isinstance(result.error, TooManyTokens)
    assert (result.error.tokens, result.error.limit) == (42, 32)
    assert "42 tokens" in str(result.error) and "at most 32" in str(result.error)


def test_pixel_limit_is_enforced_per_item(settings: Settings) -> None:
    small_cap = load("demo-clip", settings.model_copy(update={"max_image_pixels": 100 * 100}).models_config())
    results = small_cap.encoder("image").encode_items([_image((0, 0, 0), (99, 99)), _image((0, 0, 0), (101, 100))])
    assert results[0].ok and not results[1].ok
    assert "10100 pixels" in str(results[1].error)


def test_unknown_modality_is_clear(demo_clip: LoadedModel) -> None:
    with pytest.raises(Exception, match="has no audio encoder"):
        demo_clip.encoder("audio")


TEXTS = ["red", "a large red circle in the top left and a small blue square in the bottom right"]


@pytest.mark.parametrize("fixture", ["demo_clip", "vit_b32"])
def test_text_batches_stop_at_the_longest_text_with_the_same_vectors(request: pytest.FixtureRequest, fixture: str):
    """Cutting trailing padding is exact for a causal tower that pools at the end token."""
    text = request.getfixturevalue(fixture).encoder(Modality.TEXT)
    prepared = [text.preprocess(t) for t in TEXTS]
    assert text.pad_to_longest
    trimmed = text.encode(prepared)
    text.pad_to_longest = False
    try:
        full = text.encode(prepared)
    finally:
        text.pad_to_longest = True
    assert np.allclose(trimmed, full, atol=1e-5)


def test_trimmed_text_forward_equals_open_clips_encode_text(demo_clip: LoadedModel) -> None:
    import open_clip

    reference_model = open_clip.create_model(f"local-dir:{demo_clip.weights}").eval()
    text = demo_clip.encoder(Modality.TEXT)
    prepared = [text.preprocess(t) for t in TEXTS]
    ids = torch.zeros((len(TEXTS), text.limits.max_tokens or 0), dtype=torch.long)
    for row, p in enumerate(prepared):
        ids[row, : len(p.data)] = torch.tensor(p.data)
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(reference_model.encode_text(ids).float(), dim=-1).numpy()
    assert np.allclose(text.encode(prepared), reference, atol=1e-5)
