"""Sources for bulk jobs: folders, manifests, S3 prefixes (a real SeaweedFS server), URL lists
(a real local HTTP server), and the DataLoader step that reads, hashes, decodes and preprocesses
in worker processes without ever letting one bad item stop the run."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from http_handler import SiteHandler
from PIL import Image
from s3 import S3Server

import mmembed.loaders.sources as sources
from mmembed.config import Settings
from mmembed.encoders import LoadedModel, Prepared
from mmembed.encoders.whisper_family import prepare_audio
from mmembed.jobs.dataset import Loaded, SourceDataset, make_loader
from mmembed.loaders.audio import AudioLimits
from mmembed.loaders.images import DecodeLimits, decode_image
from mmembed.loaders.sources import SourceError, SourceItem, check_inside_roots, list_source, read_item, s3_client
from mmembed.loaders.url_policy import UrlPolicy

LOCAL = UrlPolicy(allow_hosts=("127.0.0.1",))  # the local test servers; the default refuses them


def png(colour: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def sine_wav(seconds: float = 0.5, rate: int = 22_050) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def code_of(call: Callable[[], object]) -> str:
    with pytest.raises(SourceError) as info:
        call()
    return info.value.code


# --- folders -------------------------------------------------------------------------------------


def test_folder_lists_media_recursively_sorted_and_versioned(tmp_path: Path) -> None:
    root = tmp_path / "media"
    write(root / "b.jpg", b"jpeg bytes")
    write(root / "sub" / "a.PNG", b"png")
    write(root / "sub" / "deep" / "voice.wav", b"RIFF....")
    write(root / "zz.mp3", b"ID3")
    write(root / "notes.txt", b"not media")
    write(root / "sub" / "data.bin", b"not media")
    write(root / ".thumbnails" / "c.jpg", b"hidden folder")
    write(root / "._b.jpg", b"macOS resource fork")

    items = list_source(str(root))

    expected = ["b.jpg", "sub/a.PNG", "sub/deep/voice.wav", "zz.mp3"]
    assert [i.uri for i in items] == sorted((root / p).as_uri() for p in expected)
    by_name = {Path(i.uri).name: i for i in items}
    assert {n: i.kind for n, i in by_name.items()} == {
        "b.jpg": "image",
        "a.PNG": "image",
        "voice.wav": "audio",
        "zz.mp3": "audio",
    }
    assert by_name["b.jpg"].size == len(b"jpeg bytes")
    st = (root / "b.jpg").stat()
    assert by_name["b.jpg"].version == f"{st.st_mtime_ns}-{st.st_size}"
    assert all(i.caption is None and i.meta == {} for i in items)

    write(root / "b.jpg", b"rewritten, longer jpeg bytes")
    os.utime(root / "b.jpg", ns=(st.st_mtime_ns + 10**9, st.st_mtime_ns + 10**9))
    again = {Path(i.uri).name: i for i in list_source(str(root))}
    assert again["b.jpg"].version != by_name["b.jpg"].version
    assert again["b.jpg"].size == len(b"rewritten, longer jpeg bytes")
    assert again["a.PNG"] == by_name["a.PNG"]  # untouched files keep their version


def test_unknown_and_missing_sources(tmp_path: Path) -> None:
    write(tmp_path / "config.yaml", b"a: 1")
    assert code_of(lambda: list_source(str(tmp_path / "nope"))) == "source_not_found"
    for source in (str(tmp_path / "config.yaml"), "https://example.com/a.jpg", "gs://bucket/x"):
        with pytest.raises(SourceError) as info:
            list_source(source)
        assert info.value.code == "unsupported_source"
        assert "s3://bucket/prefix" in str(info.value) and ".parquet" in str(info.value)


# --- manifests -----------------------------------------------------------------------------------

ROWS: list[dict[str, Any]] = [
    {"path": "../media/photo.jpg", "caption": "a red square", "kind": "", "shop": "north", "sku": "A1"},
    {"path": "../media/sub/clip.wav", "caption": "", "kind": "", "shop": "south", "sku": ""},
    {"path": "../media/scan.bin", "caption": "", "kind": "image", "shop": "", "sku": "C3"},  # kind, no extension
    {"path": "../media/cover.jpg", "caption": "spoken", "kind": "Audio", "shop": "", "sku": ""},  # kind wins
    {"path": "s3://bucket/key/b.png", "caption": "", "kind": "", "shop": "", "sku": ""},
    {"path": "https://example.com/x/song.mp3?sig=1", "caption": "", "kind": "", "shop": "", "sku": ""},
    {"path": "../media/missing.png", "caption": "", "kind": "", "shop": "", "sku": ""},  # listed; reading fails
]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    # JSONL leaves empty fields out, as a real producer would.
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if v != ""}) + "\n" for r in rows))


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    pq.write_table(pa.Table.from_pylist([{k: (v or None) for k, v in r.items()} for r in rows]), path)


WRITERS = {".csv": write_csv, ".jsonl": write_jsonl, ".parquet": write_parquet}


def test_manifests_in_every_format_give_the_same_items(tmp_path: Path) -> None:
    media = tmp_path / "media"
    for name in ("photo.jpg", "sub/clip.wav", "scan.bin", "cover.jpg"):
        write(media / name, name.encode())
    (tmp_path / "lists").mkdir()

    listed = {}
    for suffix, writer in WRITERS.items():
        writer(tmp_path / "lists" / f"catalogue{suffix}", ROWS)
        listed[suffix] = list_source(str(tmp_path / "lists" / f"catalogue{suffix}"))
    assert listed[".csv"] == listed[".jsonl"] == listed[".parquet"]

    items = {i.uri: i for i in listed[".csv"]}
    assert list(items) == sorted(items)
    photo = items[(media / "photo.jpg").as_uri()]
    assert (photo.kind, photo.caption, photo.meta) == ("image", "a red square", {"shop": "north", "sku": "A1"})
    assert photo.size == len(b"photo.jpg") and photo.version is not None
    assert items[(media / "sub" / "clip.wav").as_uri()].kind == "audio"
    assert items[(media / "scan.bin").as_uri()].kind == "image"
    cover = items[(media / "cover.jpg").as_uri()]
    assert (cover.kind, cover.caption) == ("audio", "spoken")
    remote = items["s3://bucket/key/b.png"]
    assert (remote.kind, remote.size, remote.version, remote.meta) == ("image", None, None, {})
    assert items["https://example.com/x/song.mp3?sig=1"].kind == "audio"
    missing = items[(media / "missing.png").as_uri()]
    assert (missing.size, missing.version) == (None, None)


def test_a_manifest_of_a_folders_files_gives_the_folders_items(tmp_path: Path) -> None:
    root = tmp_path / "media"
    names = ["a.jpg", "sub/b.png", "sub/c.flac"]
    for name in names:
        write(root / name, name.encode() * 3)
    manifest = tmp_path / "m.jsonl"
    absolute = str(root / "a.jpg")
    rows = [{"uri": absolute}, {"uri": "media/sub/b.png"}, {"uri": (root / "sub" / "c.flac").as_uri()}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list_source(str(manifest)) == list_source(str(root))


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("m.csv", "path,caption\na.jpg,ok\n,no path here\n", "line 3"),
        ("m.csv", "path,caption\na.jpg,ok\nb.jpg,one,two\n", "line 3"),
        ("m.csv", "file,caption\na.jpg,ok\n", "no uri, path, url column"),
        ("m.jsonl", '{"uri": "a.jpg"}\n{"uri": \n', "line 2"),
        ("m.jsonl", '{"uri": "a.jpg"}\n\n{"caption": "where is the file"}\n', "line 3"),
        ("m.jsonl", '["a.jpg"]\n', "line 1"),
        ("m.jsonl", '{"uri": 42}\n', "line 1"),
        ("m.jsonl", '{"uri": "a.jpg", "kind": "video"}\n', "line 1"),
        ("m.jsonl", '{"uri": "a.jpg"}\n{"uri": "notes.txt"}\n', "line 2"),
        ("m.jsonl", '{"uri": "ftp://host/a.jpg"}\n', "line 1"),
        ("m.jsonl", '{"uri": "s3://bucket-only.jpg"}\n', "line 1"),
        ("m.jsonl", '{"uri": "a.jpg", "caption": 7}\n', "line 1"),
        ("m.jsonl", '{"uri": "doc-1", "kind": "text"}\n', "line 1 is a text item without a text"),
        ("m.jsonl", '{"uri": "a.jpg"}\n{"uri": "b.jpg"}\n{"uri": "./a.jpg"}\n', "more than once"),
        ("urls.txt", "# images\nhttps://example.com/a.jpg\n\nexample.com/b.jpg\n", "line 4"),
        ("urls.txt", "https://example.com/a.jpg\nhttps://example.com/render?id=3\n", "line 2"),
        ("m.parquet", "not parquet at all", "not a readable Parquet file"),
    ],
)
def test_bad_manifest_rows_are_named(tmp_path: Path, name: str, content: str, where: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(SourceError) as info:
        list_source(str(tmp_path / name))
    assert info.value.code == "bad_manifest"
    assert where in str(info.value)


def test_bad_parquet_row_is_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"path": ["a.jpg", None, "c.jpg"], "caption": ["x", "y", None]}), tmp_path / "m.parquet")
    with pytest.raises(SourceError) as info:
        list_source(str(tmp_path / "m.parquet"))
    assert info.value.code == "bad_manifest"
    assert "row 2" in str(info.value)


# --- reading files -------------------------------------------------------------------------------


def test_read_file_failures_have_codes(tmp_path: Path) -> None:
    data = write(tmp_path / "a b.png", png((1, 2, 3)))
    item = list_source(str(tmp_path))[0]
    assert item.uri.endswith("/a%20b.png")
    assert read_item(item) == data.read_bytes()
    assert code_of(lambda: read_item(item, max_bytes=10)) == "too_large"
    assert code_of(lambda: read_item(SourceItem((tmp_path / "gone.png").as_uri(), "image"))) == "not_found"
    (tmp_path / "dir.png").mkdir()
    assert code_of(lambda: read_item(SourceItem((tmp_path / "dir.png").as_uri(), "image"))) == "read_error"
    assert code_of(lambda: read_item(SourceItem("gs://bucket/a.png", "image"))) == "bad_uri"


# --- S3 ------------------------------------------------------------------------------------------


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A fresh bucket with media and non-media under photos/, and neighbours that must not be listed."""
    bucket = f"src-{uuid.uuid4().hex[:20]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    objects = {
        "photos/a.jpg": jpeg((200, 10, 10)),
        "photos/readme.txt": b"not media",
        "photos/sub/b.png": png((10, 200, 10)),
        "photos/sub/c d.png": png((10, 10, 200)),
        "photos/voice.wav": sine_wav(),
        "photos-old/e.jpg": jpeg((0, 0, 0)),
        "other/f.jpg": jpeg((1, 1, 1)),
    }
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    yield bucket, objects


def test_s3_prefix_lists_pages_of_media_with_etags(
    s3_server: S3Server, s3_bucket: tuple[str, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, objects = s3_bucket
    client = s3_server.client()
    monkeypatch.setattr(sources, "_S3_PAGE_SIZE", 2)  # several pages: a listing that stops at one misses items

    items = list_source(f"s3://{bucket}/photos", client)

    keys = ["photos/a.jpg", "photos/sub/b.png", "photos/sub/c d.png", "photos/voice.wav"]
    assert [i.uri for i in items] == [f"s3://{bucket}/{k}" for k in sorted(keys)]
    assert [i.kind for i in items] == ["image", "image", "image", "audio"]
    for item, key in zip(items, sorted(keys), strict=True):
        assert item.size == len(objects[key])
        assert item.version == client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        assert read_item(item, client) == objects[key]
    assert list_source(f"s3://{bucket}/photos/", client) == items
    assert len(list_source(f"s3://{bucket}", client)) == len(keys) + 2  # the whole bucket

    client.put_object(Bucket=bucket, Key="photos/a.jpg", Body=jpeg((0, 200, 200)))
    assert list_source(f"s3://{bucket}/photos", client)[0].version != items[0].version

    assert code_of(lambda: read_item(SourceItem(f"s3://{bucket}/photos/gone.jpg", "image"), client)) == "not_found"
    assert code_of(lambda: read_item(items[0], client, max_bytes=100)) == "too_large"
    assert code_of(lambda: list_source(f"s3://no-such-{uuid.uuid4().hex[:12]}/x", client)) == "source_not_found"


def test_s3_client_uses_the_credential_chain(
    s3_server: S3Server, s3_bucket: tuple[str, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bucket, objects = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(data_dir=tmp_path, s3_endpoint_url=s3_server.endpoint_url, s3_region=s3_server.region)
    client = s3_client(settings.s3_endpoint_url, settings.s3_region)
    items = list_source(f"s3://{bucket}/photos/sub", client)
    assert [read_item(i, client) for i in items] == [objects["photos/sub/b.png"], objects["photos/sub/c d.png"]]

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert (
        code_of(lambda: list_source(f"s3://{bucket}/photos", s3_client(settings.s3_endpoint_url, settings.s3_region)))
        == "s3_error"
    )


# --- HTTP ----------------------------------------------------------------------------------------

PAGE = png((5, 6, 7))
BIG = bytes(5000)


class Handler(SiteHandler):
    def do_GET(self) -> None:
        if self.path == "/img/ok.png":
            self._send(200, PAGE)
        elif self.path == "/big.png":
            self._send(200, BIG)
        elif self.path == "/stream.png":  # no Content-Length: HTTP/1.0, the body ends when the connection closes
            self.send_response(200)
            self.end_headers()
            self.wfile.write(BIG)
        elif self.path == "/hop.png":
            self._redirect("/img/ok.png")
        elif self.path == "/loop.png":
            self._redirect("/loop.png")
        else:
            self._send(404, b"not here")


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # listening from here on: no wait needed
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A bound port that does not listen: connections to it are refused, and nothing else can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}/a.png"


def test_url_list_and_reads(tmp_path: Path, http_base: str, refused_url: str) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text(f"# catalogue\n{http_base}/img/ok.png\n\n{http_base}/a/voice.WAV\n")
    items = list_source(str(listing))
    assert [(i.uri, i.kind, i.size, i.version) for i in items] == [
        (f"{http_base}/a/voice.WAV", "audio", None, None),
        (f"{http_base}/img/ok.png", "image", None, None),
    ]
    assert read_item(items[1], url_policy=LOCAL) == PAGE
    assert read_item(SourceItem(f"{http_base}/hop.png", "image"), url_policy=LOCAL) == PAGE

    def code(path: str, **kwargs: Any) -> str:
        url = path if "://" in path else http_base + path
        return code_of(lambda: read_item(SourceItem(url, "image"), url_policy=LOCAL, **kwargs))

    assert code("/a/voice.WAV") == "url_status"
    assert code("/loop.png") == "url_redirects"
    assert code("/big.png", max_bytes=1000) == "too_large"
    assert code("/stream.png", max_bytes=1000) == "too_large"
    assert read_item(SourceItem(f"{http_base}/stream.png", "image"), max_bytes=5000, url_policy=LOCAL) == BIG
    assert code(refused_url) == "url_unreachable"


def test_url_list_on_a_private_address_is_refused_by_default(tmp_path: Path, http_base: str) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{http_base}/img/ok.png\nhttp://169.254.169.254/latest/meta-data/a.png\n")
    items = list_source(str(listing))  # listing reads nothing: only reading is refused
    assert [code_of(lambda item=item: read_item(item)) for item in items] == ["url_forbidden_address"] * 2
    dataset = SourceDataset(items, {"image": lambda image: Prepared(image, {})})
    assert [x.error[0] if x.error else None for x in (dataset[0], dataset[1])] == ["url_forbidden_address"] * 2


def test_url_that_never_answers_times_out() -> None:
    with socket.socket() as s:  # listens, so the connection is accepted by the kernel, but nothing replies
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/a.png"
        assert code_of(lambda: read_item(SourceItem(url, "image"), timeout_s=0.5, url_policy=LOCAL)) == "url_timeout"


# --- DataLoader ----------------------------------------------------------------------------------


def stamped(preprocess: Callable[[Any], Prepared]) -> Callable[[Any], Prepared]:
    """The real preprocessor, plus the id of the process that ran it."""

    def run(item: Any) -> Prepared:
        prepared = preprocess(item)
        prepared.info["pid"] = os.getpid()
        return prepared

    return run


def test_dataset_in_worker_processes_returns_every_item_once(tmp_path: Path, demo_clip: LoadedModel) -> None:
    media = tmp_path / "media"
    rng = np.random.default_rng(0)
    files = {
        "red.png": png((220, 20, 20), (48, 30)),
        "green.jpg": jpeg((20, 220, 20)),
        "grey.png": png((128, 128, 128), (10, 90)),
        "corrupt.jpg": b"\xff\xd8 this is not really a jpeg",
        "noise.png": None,  # over the image byte limit
        "tone.wav": sine_wav(0.5),
        "fake.mp3": b"no audio container here at all",
    }
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "PNG")
    files["noise.png"] = buf.getvalue()
    for name, data in files.items():
        write(media / name, data)  # type: ignore[arg-type]
    manifest = tmp_path / "m.csv"
    write_csv(manifest, [{"path": f"media/{n}"} for n in [*files, "missing.png"]])
    items = list_source(str(manifest))
    assert len(items) == 8

    image_encoder = demo_clip.encoder("image")
    limits = DecodeLimits(max_bytes=100_000)
    assert len(files["noise.png"]) > limits.max_bytes > max(len(files[n]) for n in ("red.png", "green.jpg"))
    dataset = SourceDataset(
        items,
        {"image": stamped(image_encoder.preprocess), "audio": stamped(partial(prepare_audio, limits=AudioLimits()))},
        image_limits=limits,
        audio_limits=AudioLimits(),
    )
    loader = make_loader(dataset, batch_size=3, workers=2)
    batches = list(loader)

    assert all(isinstance(b, list) and 1 <= len(b) <= 3 for b in batches)
    loaded = [x for b in batches for x in b]
    assert sorted(x.index for x in loaded) == list(range(len(items)))
    by_name = {Path(x.uri).name: x for x in loaded}
    assert all(x.uri == items[x.index].uri for x in loaded)

    for name in ("red.png", "green.jpg", "grey.png"):
        x = by_name[name]
        assert x.error is None and x.prepared is not None
        assert x.content_hash == sha256(files[name])  # type: ignore[arg-type]
        assert x.prepared.info["pid"] != os.getpid()  # decoded in a worker, not here
        expected = image_encoder.preprocess(decode_image(files[name], limits))  # type: ignore[arg-type]
        assert torch.equal(x.prepared.data, expected.data)
        assert x.read_ms >= 0 and x.decode_ms > 0
    tone = by_name["tone.wav"]
    assert tone.error is None and tone.prepared is not None
    assert tone.content_hash == sha256(files["tone.wav"])  # type: ignore[arg-type]
    assert tone.prepared.data.dtype == np.float32 and abs(len(tone.prepared.data) - 8000) <= 16
    assert tone.prepared.info["seconds"] == pytest.approx(0.5, abs=0.01)

    failures = {n: (x.error[0] if x.error else None, x.content_hash, x.prepared) for n, x in by_name.items()}
    assert failures["corrupt.jpg"] == ("not_an_image", sha256(files["corrupt.jpg"]), None)  # type: ignore[arg-type]
    assert failures["fake.mp3"] == ("unsupported_format", sha256(files["fake.mp3"]), None)  # type: ignore[arg-type]
    assert failures["noise.png"] == ("too_large", None, None)
    assert failures["missing.png"] == ("not_found", None, None)
    assert all(x.error[1] for x in loaded if x.error)  # a message with every code


def test_dataset_reads_s3_and_urls_in_workers(
    s3_server: S3Server, s3_bucket: tuple[str, dict[str, bytes]], http_base: str, demo_clip: LoadedModel
) -> None:
    bucket, objects = s3_bucket
    items = [
        *list_source(f"s3://{bucket}/photos/sub", s3_server.client()),
        SourceItem(f"s3://{bucket}/photos/gone.png", "image"),
        SourceItem(f"{http_base}/img/ok.png", "image"),
        SourceItem(f"{http_base}/hop.png", "image"),
        SourceItem(f"{http_base}/nothing.png", "image"),
        SourceItem(f"{http_base}/x.wav", "audio"),  # no audio preprocessor in this job
    ]
    s3_config = {
        "endpoint_url": s3_server.endpoint_url,
        "aws_access_key_id": s3_server.access_key,
        "aws_secret_access_key": s3_server.secret_key,
        "region_name": s3_server.region,
    }
    dataset = SourceDataset(
        items, {"image": demo_clip.encoder("image").preprocess}, s3_config=s3_config, url_policy=LOCAL
    )
    in_process = [x for b in make_loader(dataset, batch_size=2, workers=0) for x in b]
    # Its S3 and HTTP clients now exist; a spawned worker would get it pickled, without them.
    assert pickle.loads(pickle.dumps(dataset)).__dict__.keys() == dataset.__dict__.keys()
    loaded = sorted((x for b in make_loader(dataset, batch_size=2, workers=2) for x in b), key=lambda x: x.index)
    assert [(x.uri, x.error, x.content_hash) for x in loaded] == [(x.uri, x.error, x.content_hash) for x in in_process]

    assert [x.uri for x in loaded] == [i.uri for i in items]
    assert [x.error[0] if x.error else None for x in loaded] == [
        None,
        None,
        "not_found",
        None,
        None,
        "url_status",
        "unsupported_kind",
    ]
    hashes = [sha256(objects["photos/sub/b.png"]), sha256(objects["photos/sub/c d.png"]), None, sha256(PAGE)]
    assert [x.content_hash for x in loaded[:5]] == [*hashes, sha256(PAGE)]


def test_unreadable_preprocessor_failures_are_recorded_not_raised(tmp_path: Path) -> None:
    write(tmp_path / "a.png", png((1, 1, 1)))
    write(tmp_path / "b.wav", sine_wav())

    def broken(image: Any) -> Prepared:
        raise ZeroDivisionError("a bug in a preprocessor")

    dataset = SourceDataset(list_source(str(tmp_path)), {"image": broken})
    loaded = [x for b in make_loader(dataset, batch_size=4, workers=0) for x in b]
    assert [x.error[0] if x.error else None for x in loaded] == ["internal_error", "unsupported_kind"]
    assert "ZeroDivisionError" in loaded[0].error[1]  # type: ignore[index]


def test_a_batch_from_a_worker_crosses_as_one_storage_per_dtype(tmp_path: Path) -> None:
    """Each storage a worker sends costs the job's process a connection to that worker, so a batch's
    tensors travel as views of one buffer per dtype, with the same values and failures kept."""
    for i in range(7):
        write(tmp_path / f"{i}.png", png((i * 30, 10, 200), size=(3 + i, 5 + 2 * i)))
    write(tmp_path / "7.png", b"not a png")

    def two_models(image: Image.Image) -> dict[str, Prepared]:
        pixels = torch.from_numpy(np.asarray(image).copy())
        where = {"pid": os.getpid()}
        return {"a": Prepared(pixels, where), "b": Prepared(pixels.float() / 255, where), "c": Prepared([1, 2], where)}

    dataset = SourceDataset(list_source(str(tmp_path)), {"image": two_models})  # type: ignore[dict-item]
    in_process = {x.uri: x for b in make_loader(dataset, batch_size=4, workers=0) for x in b}
    batches = list(make_loader(dataset, batch_size=4, workers=2))
    assert len(batches) == 2
    for batch in batches:
        good = [x.prepared for x in batch if x.prepared is not None]
        assert len(good) >= 3 and all(p["a"].info["pid"] != os.getpid() for p in good)  # type: ignore[index]
        for key in ("a", "b"):
            storages = {p[key].data.untyped_storage().data_ptr() for p in good}  # type: ignore[index]
            assert len(storages) == 1, f"{key}: {len(storages)} storages in one batch"
        assert {p["a"].data.untyped_storage().data_ptr() for p in good} != {  # type: ignore[index]
            p["b"].data.untyped_storage().data_ptr()  # type: ignore[index]
            for p in good
        }
        for x in batch:
            expected = in_process[x.uri]
            assert x.error == expected.error
            if x.prepared is None:
                continue
            for key in ("a", "b"):
                got, want = x.prepared[key].data, expected.prepared[key].data  # type: ignore[index]
                assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
            assert x.prepared["c"].data == [1, 2]  # type: ignore[index]
    errors = [x.error[0] for b in batches for x in b if x.error]
    assert errors == ["not_an_image"]


@pytest.mark.parametrize(("device", "policy", "niceness"), [("cpu", os.SCHED_IDLE, 0), ("mps", os.SCHED_OTHER, 10)])
def test_workers_yield_the_cpu_to_the_model(tmp_path: Path, device: str, policy: int, niceness: int) -> None:
    """Beside a forward pass on the CPU, workers take only idle cores; beside an accelerator, a lower
    priority that other busy processes cannot starve."""
    write(tmp_path / "a.png", png((1, 2, 3)))

    def where(image: Image.Image) -> Prepared:
        return Prepared(None, {"policy": os.sched_getscheduler(0), "nice": os.nice(0)})

    dataset = SourceDataset(list_source(str(tmp_path)), {"image": where})
    [[loaded]] = list(make_loader(dataset, batch_size=1, workers=1, device=device))
    assert loaded.prepared is not None
    assert loaded.prepared.info == {"policy": policy, "nice": os.nice(0) + niceness}


def test_make_loader_settings() -> None:
    dataset = SourceDataset([], {})
    cpu = make_loader(dataset, batch_size=8, workers=2)
    assert (cpu.pin_memory, cpu.num_workers, cpu.prefetch_factor, cpu.persistent_workers) == (False, 2, 2, False)
    assert cpu.batch_size == 8
    assert cpu.multiprocessing_context.get_start_method() == "fork"  # type: ignore[union-attr]
    in_process = make_loader(dataset, batch_size=8, workers=0, prefetch=4)
    assert (in_process.num_workers, in_process.prefetch_factor, in_process.multiprocessing_context) == (0, None, None)
    assert make_loader(dataset, batch_size=8, workers=1, device="cuda:0", prefetch=3).pin_memory is True
    assert make_loader(dataset, batch_size=8, workers=1, device="cuda:0", prefetch=3).prefetch_factor == 3
    assert make_loader(dataset, batch_size=8, workers=1, device="auto").pin_memory is torch.cuda.is_available()
    # A server job's catalogue replica runs no model: whatever device its settings name, the loader works.
    assert make_loader(dataset, batch_size=8, workers=0, device="no-such-device").pin_memory is False


def test_auto_means_the_device_the_models_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """``device: auto`` (the default setting) is resolved as the models resolve it: on a CUDA machine
    the loader pins memory. No GPU here, so CUDA's presence is what is stubbed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert make_loader(SourceDataset([], {}), batch_size=8, workers=1, device="auto").pin_memory is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning host memory needs CUDA")
def test_batches_are_pinned_on_cuda(tmp_path: Path) -> None:
    for i in range(4):
        write(tmp_path / f"{i}.png", png((i * 40, 0, 0)))
    write(tmp_path / "bad.png", b"not a png")

    def to_tensor(image: Image.Image) -> Prepared:
        return Prepared(torch.from_numpy(np.asarray(image).copy()))

    dataset = SourceDataset(list_source(str(tmp_path)), {"image": to_tensor})
    loaded: list[Loaded] = [x for b in make_loader(dataset, batch_size=2, workers=2, device="cuda") for x in b]
    good = [x for x in loaded if x.prepared is not None]
    assert len(good) == 4 and all(x.prepared.data.is_pinned() for x in good)  # type: ignore[union-attr]
    assert [x.error[0] for x in loaded if x.error] == ["not_an_image"]


def test_local_reads_stay_inside_the_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "in.png").write_bytes(b"inside")
    (outside / "out.png").write_bytes(b"outside")
    (root / "link.png").symlink_to(outside / "out.png")
    roots = [root]
    assert read_item(SourceItem((root / "in.png").as_uri(), "image"), file_roots=roots) == b"inside"
    assert read_item(SourceItem((outside / "out.png").as_uri(), "image")) == b"outside"  # no roots: anywhere
    for escape in (outside / "out.png", root / "link.png", root / ".." / "outside" / "out.png"):
        with pytest.raises(SourceError) as caught:
            read_item(SourceItem(f"file://{escape}", "image"), file_roots=roots)
        assert caught.value.code == "path_forbidden", escape
    with pytest.raises(SourceError):
        check_inside_roots(Path("/etc/hostname"), roots)
    check_inside_roots(root / "sub" / ".." / "in.png", roots)
