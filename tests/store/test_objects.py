"""The object store's contract, on a local folder and on a real S3 server (SeaweedFS, which checks
signatures), so what passes here also holds against AWS or MinIO."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from botocore.config import Config
from s3 import S3Server

from mmembed.config import Settings
from mmembed.store.objects import (
    LocalObjects,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    S3Objects,
    object_key,
    object_store,
)

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # the store never looks inside
AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(200)


def key_for(data: bytes, filename: str | None = None, content_type: str = "image/png") -> str:
    return object_key(hashlib.sha256(data).hexdigest(), filename, content_type)


def fresh_bucket() -> str:
    return f"test-{uuid.uuid4().hex[:24]}"


def use_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, access_key: str, secret_key: str) -> None:
    """S3Objects takes credentials from boto3's usual chain: here the environment, with no
    ~/.aws files or metadata service to fall back on."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    for name in (
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    use_credentials(monkeypatch, tmp_path, s3_server.access_key, s3_server.secret_key)
    return s3_server


@pytest.fixture
def make_s3(s3_env: S3Server) -> Callable[..., S3Objects]:
    """A store on a fresh bucket per call, so tests share the server but never each other's objects."""

    def make(**overrides: object) -> S3Objects:
        args: dict[str, object] = {"endpoint_url": s3_env.endpoint_url, "region": s3_env.region} | overrides
        return S3Objects(str(args.pop("bucket", fresh_bucket())), **args)  # type: ignore[arg-type]

    return make


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjects(tmp_path / "objects")
    return request.getfixturevalue("make_s3")()


# --- the same contract on both ------------------------------------------------------------------


def test_put_get_round_trip(store: ObjectStore) -> None:
    image_uri = store.put(key_for(IMAGE), IMAGE, "image/png")
    audio_uri = store.put(key_for(AUDIO, content_type="audio/wav"), AUDIO, "audio/wav")
    assert image_uri != audio_uri
    assert store.get(image_uri) == IMAGE
    assert store.get(audio_uri) == AUDIO


def test_put_of_the_same_key_again_is_the_same_object(store: ObjectStore) -> None:
    key = key_for(IMAGE)
    first = store.put(key, IMAGE, "image/png")
    assert store.put(key, IMAGE, "image/png") == first
    assert store.get(first) == IMAGE


def test_exists_and_delete_idempotent(store: ObjectStore) -> None:
    uri = store.put(key_for(IMAGE), IMAGE, "image/png")
    kept = store.put(key_for(AUDIO, content_type="audio/wav"), AUDIO, "audio/wav")
    assert store.exists(uri)
    store.delete(uri)
    assert not store.exists(uri)
    with pytest.raises(ObjectNotFound, match="no object at"):
        store.get(uri)
    store.delete(uri)  # again: no error
    assert not store.exists(uri)
    assert store.exists(kept), "deleting one object must leave the others"


def test_uris_name_the_object(store: ObjectStore, tmp_path: Path) -> None:
    key = key_for(IMAGE)
    uri = store.put(key, IMAGE, "image/png")
    if isinstance(store, LocalObjects):
        assert uri == "file://" + str((tmp_path / "objects" / key).resolve())
        assert Path(uri.removeprefix("file://")).read_bytes() == IMAGE
    else:
        assert isinstance(store, S3Objects)
        assert uri == f"s3://{store.bucket}/mmembed/{key}"


@pytest.mark.parametrize(
    "key", ["../escape.png", "ab/../../escape.png", "/etc/passwd", "", "ab//x.png", "./x", "ab/..", "ab/" + "x" * 256]
)
def test_keys_that_could_escape_are_refused(store: ObjectStore, key: str, tmp_path: Path) -> None:
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ObjectStoreError, match="invalid object key"):
        store.put(key, IMAGE, "image/png")
    assert sorted(tmp_path.rglob("*")) == before


# --- local folder --------------------------------------------------------------------------------


def test_local_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    store = LocalObjects(tmp_path / "objects")
    (tmp_path / "objects").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "objects" / "ab").symlink_to(tmp_path / "outside")
    with pytest.raises(ObjectStoreError, match="outside the object folder"):
        store.put("ab/x.png", IMAGE, "image/png")
    assert list((tmp_path / "outside").iterdir()) == []
    (tmp_path / "objects" / "cd").mkdir()
    (tmp_path / "objects" / "cd" / "y.png").symlink_to(tmp_path / "outside" / "y.png")
    with pytest.raises(ObjectStoreError, match="outside the object folder"):
        store.get(store.put("cd/y.png", IMAGE, "image/png"))
    (tmp_path / "objects" / "ef").symlink_to(tmp_path / "objects" / "cd")  # a link that stays inside is fine
    assert store.get(store.put("ef/z.png", IMAGE, "image/png")) == IMAGE


def test_local_uris_outside_the_folder_are_refused(tmp_path: Path) -> None:
    store = LocalObjects(tmp_path / "objects")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not an object")
    outside = "file://" + str(secret)
    dotdot = "file://" + str(tmp_path / "objects" / ".." / "secret.txt")
    for uri in (outside, dotdot, "s3://bucket/mmembed/ab/x.png", str(secret)):
        for call in (store.get, store.exists, store.delete, store.http_url):
            with pytest.raises(ObjectStoreError) as refused:
                call(uri)
            assert not isinstance(refused.value, ObjectNotFound), f"{call.__name__}({uri}) must be refused, not missing"
    assert secret.read_bytes() == b"not an object"


def test_local_http_url_and_path_for(tmp_path: Path) -> None:
    store = LocalObjects(tmp_path / "objects")
    key = key_for(IMAGE)
    uri = store.put(key, IMAGE, "image/png")
    assert store.http_url(uri) == f"/objects/{key}"
    assert store.path_for(key).read_bytes() == IMAGE
    assert LocalObjects(tmp_path / "objects", "https://cdn.example/objs/").http_url(uri) == (
        f"https://cdn.example/objs/{key}"
    )
    spaced = store.put("ab/a b.png", IMAGE, "image/png")
    assert store.http_url(spaced) == "/objects/ab/a%20b.png"


def test_local_put_leaves_no_partial_files(tmp_path: Path) -> None:
    store = LocalObjects(tmp_path / "objects")
    key = key_for(IMAGE)
    store.put(key, IMAGE, "image/png")
    store.put(key, IMAGE, "image/png")
    files = [p.relative_to(tmp_path / "objects").as_posix() for p in (tmp_path / "objects").rglob("*") if p.is_file()]
    assert files == [key]


def test_local_put_makes_a_folder_removed_behind_the_store_again(tmp_path: Path) -> None:
    store = LocalObjects(tmp_path / "objects")
    key = key_for(IMAGE)
    store.put(key, IMAGE, "image/png")
    shutil.rmtree(tmp_path / "objects")
    uri = store.put(key, IMAGE, "image/png")
    assert store.get(uri) == IMAGE


# --- S3 ------------------------------------------------------------------------------------------


def test_s3_creates_the_bucket_on_first_write(make_s3: Callable[..., S3Objects], s3_server: S3Server) -> None:
    store = make_s3()
    raw = s3_server.client()
    with pytest.raises(raw.exceptions.ClientError):
        raw.head_bucket(Bucket=store.bucket)
    uri = store.put(key_for(IMAGE), IMAGE, "image/png")
    raw.head_bucket(Bucket=store.bucket)
    stored = raw.get_object(Bucket=store.bucket, Key=f"mmembed/{key_for(IMAGE)}")
    assert stored["Body"].read() == IMAGE
    assert stored["ContentType"] == "image/png"
    assert store.get(uri) == IMAGE


def test_s3_uses_an_existing_bucket(make_s3: Callable[..., S3Objects], s3_server: S3Server) -> None:
    bucket = fresh_bucket()
    s3_server.client().create_bucket(Bucket=bucket)
    store = make_s3(bucket=bucket)
    assert store.get(store.put(key_for(IMAGE), IMAGE, "image/png")) == IMAGE
    store._create_bucket()  # a creation that races another writer's: BucketAlreadyOwnedByYou is fine


def test_s3_missing_bucket_reads_as_missing_object(make_s3: Callable[..., S3Objects]) -> None:
    store = make_s3()
    uri = f"s3://{store.bucket}/mmembed/ab/never.png"
    assert not store.exists(uri)
    with pytest.raises(ObjectNotFound):
        store.get(uri)
    store.delete(uri)


@pytest.mark.parametrize(("prefix", "stored_as"), [("custom", "custom/"), ("/deep/er/", "deep/er/"), ("", "")])
def test_s3_prefix(make_s3: Callable[..., S3Objects], s3_server: S3Server, prefix: str, stored_as: str) -> None:
    store = make_s3(prefix=prefix)
    key = key_for(IMAGE)
    assert store.put(key, IMAGE, "image/png") == f"s3://{store.bucket}/{stored_as}{key}"
    assert s3_server.client().get_object(Bucket=store.bucket, Key=stored_as + key)["Body"].read() == IMAGE


def test_s3_presigned_url_is_fetchable_and_tampering_is_refused(make_s3: Callable[..., S3Objects]) -> None:
    store = make_s3(presign_seconds=600)
    uri = store.put(key_for(IMAGE), IMAGE, "image/png")
    other = store.put(key_for(AUDIO, content_type="audio/wav"), AUDIO, "audio/wav")
    url = store.http_url(uri)
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["600"]
    fetched = httpx.get(url)
    assert fetched.status_code == 200
    assert fetched.content == IMAGE
    assert fetched.headers["content-type"] == "image/png"

    signature = query["X-Amz-Signature"][0]
    forged = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert httpx.get(url.replace(signature, forged)).status_code == 403
    # The signature covers the key: it opens no other object.
    assert httpx.get(url.replace(key_for(IMAGE), key_for(AUDIO, content_type="audio/wav"))).status_code == 403
    assert httpx.get(store.http_url(other)).content == AUDIO
    # Without any signature the bucket is private.
    assert httpx.get(url.split("?")[0]).status_code == 403


def test_s3_public_base_url_gives_the_plain_url(make_s3: Callable[..., S3Objects], s3_server: S3Server) -> None:
    bucket = fresh_bucket()
    public_base = f"{s3_server.endpoint_url}/{bucket}"
    store = make_s3(bucket=bucket, public_base_url=public_base + "/")
    key = key_for(IMAGE)
    uri = store.put(key, IMAGE, "image/png")
    assert store.http_url(uri) == f"{public_base}/mmembed/{key}"
    # Make the bucket publicly readable, as a public base URL presumes, and load the URL anonymously.
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject"], "Resource": [f"arn:aws:s3:::{bucket}/*"]}
        ],
    }
    s3_server.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    fetched = httpx.get(store.http_url(uri))
    assert fetched.status_code == 200
    assert fetched.content == IMAGE


def test_s3_uris_of_another_bucket_are_refused(make_s3: Callable[..., S3Objects], s3_server: S3Server) -> None:
    store = make_s3()
    store.put(key_for(IMAGE), IMAGE, "image/png")
    other = fresh_bucket()
    raw = s3_server.client()
    raw.create_bucket(Bucket=other)
    raw.put_object(Bucket=other, Key="mmembed/ab/x.png", Body=b"someone else's")
    for uri in (f"s3://{other}/mmembed/ab/x.png", f"s3://{store.bucket}/", f"s3://{store.bucket}x/mmembed/ab/x.png"):
        for call in (store.get, store.exists, store.delete, store.http_url):
            with pytest.raises(ObjectStoreError, match="not an object URI in bucket") as refused:
                call(uri)
            assert not isinstance(refused.value, ObjectNotFound)
    with pytest.raises(ObjectStoreError, match="not an object URI"):
        store.get("file:///etc/passwd")
    assert raw.get_object(Bucket=other, Key="mmembed/ab/x.png")["Body"].read() == b"someone else's"


def test_s3_wrong_credentials_are_a_clear_error(
    make_s3: Callable[..., S3Objects], monkeypatch: pytest.MonkeyPatch, s3_server: S3Server
) -> None:
    good = make_s3()
    uri = good.put(key_for(IMAGE), IMAGE, "image/png")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    bad = make_s3(bucket=good.bucket)
    bad_fresh = make_s3()
    calls = [
        lambda: bad.get(uri),
        lambda: bad.exists(uri),  # an error, never "False": the object is there
        lambda: bad.delete(uri),
        lambda: bad_fresh.put(key_for(IMAGE), IMAGE, "image/png"),
    ]
    for call in calls:
        with pytest.raises(ObjectStoreError) as failed:
            call()
        message = str(failed.value)
        assert type(failed.value) is ObjectStoreError
        assert "check the credentials" in message
        assert s3_server.endpoint_url in message
        assert good.bucket in message or bad_fresh.bucket in message
    assert good.get(uri) == IMAGE, "the failed delete must not have deleted it"


def test_s3_no_credentials_is_a_clear_error(make_s3: Callable[..., S3Objects], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = make_s3()
    with pytest.raises(ObjectStoreError, match="no credentials found; set AWS_ACCESS_KEY_ID"):
        store.put(key_for(IMAGE), IMAGE, "image/png")


def test_s3_unreachable_endpoint_is_a_clear_error(s3_env: S3Server) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(retries={"max_attempts": 1})
    )
    store = S3Objects(fresh_bucket(), endpoint_url=endpoint, client=client)
    with pytest.raises(ObjectStoreError, match=rf"at {re.escape(endpoint)}: .*check the endpoint URL"):
        store.put(key_for(IMAGE), IMAGE, "image/png")


def test_s3_presigned_urls_for_aws_are_sigv4_on_the_regional_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Signed offline, no request made. Left to its defaults, botocore presigns with SigV2 (which
    newer regions refuse) on the global host."""
    use_credentials(monkeypatch, tmp_path, "AKIAEXAMPLE", "not-a-real-secret")
    store = S3Objects("my-bucket", region="eu-west-1")
    url = urlsplit(store.http_url("s3://my-bucket/mmembed/ab/x.png"))
    assert url.netloc == "my-bucket.s3.eu-west-1.amazonaws.com"
    assert url.path == "/mmembed/ab/x.png"
    assert parse_qs(url.query)["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]


# --- keys and configuration ----------------------------------------------------------------------


def test_object_key_is_content_addressed() -> None:
    digest = hashlib.sha256(IMAGE).hexdigest()
    assert object_key(digest, "photo.png", "image/png") == f"{digest[:2]}/{digest}.png"
    assert object_key(digest, "photo.png", "image/png") == object_key(digest, "photo.png", "image/png")
    other = hashlib.sha256(AUDIO).hexdigest()
    assert object_key(other, "photo.png", "image/png") != object_key(digest, "photo.png", "image/png")
    # One object for the same bytes, however the uploads were named.
    assert object_key(digest, "a.jpeg", "image/jpeg") == object_key(digest, "B.JPG", "image/jpeg")


@pytest.mark.parametrize(
    ("filename", "content_type", "ext"),
    [
        (None, "image/jpeg", ".jpg"),
        (None, "image/png", ".png"),
        (None, "image/webp", ".webp"),
        (None, "audio/wav", ".wav"),
        (None, "audio/x-wav", ".wav"),
        (None, "audio/mpeg", ".mp3"),
        (None, "audio/flac", ".flac"),
        (None, "audio/mp4", ".m4a"),
        (None, "IMAGE/PNG; charset=binary", ".png"),
        ("scan.TIFF", "application/octet-stream", ".tiff"),
        ("clip.opus", "application/x-unknown", ".opus"),
        ("C:\\photos\\cat.Jpg", "", ".jpg"),
        ("noextension", "application/x-unknown", ""),
        ("weird.p?g", "application/x-unknown", ""),
        (None, "application/octet-stream", ""),
    ],
)
def test_object_key_extension(filename: str | None, content_type: str, ext: str) -> None:
    digest = hashlib.sha256(IMAGE).hexdigest()
    assert object_key(digest, filename, content_type) == f"{digest[:2]}/{digest}{ext}"


@pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "../" + "a" * 64, "g" * 64])
def test_object_key_needs_a_real_digest(bad: str) -> None:
    with pytest.raises(ValueError, match="hex digest"):
        object_key(bad, "x.png", "image/png")


def test_object_store_from_settings(tmp_path: Path, s3_env: S3Server) -> None:
    local = object_store(Settings(data_dir=tmp_path).objects_config())
    assert isinstance(local, LocalObjects)
    assert local.root == (tmp_path / "objects").resolve()

    bucket = fresh_bucket()
    settings = Settings(
        data_dir=tmp_path,
        s3_bucket=bucket,
        s3_prefix="from-settings/",
        s3_endpoint_url=s3_env.endpoint_url,
        s3_region=s3_env.region,
        s3_presign_seconds=120,
    )
    remote = object_store(settings.objects_config())
    assert isinstance(remote, S3Objects)
    uri = remote.put(key_for(IMAGE), IMAGE, "image/png")
    assert uri == f"s3://{bucket}/from-settings/{key_for(IMAGE)}"
    url = remote.http_url(uri)
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["120"]
    assert httpx.get(url).content == IMAGE
    public = object_store(settings.model_copy(update={"s3_public_base_url": "https://cdn.example"}).objects_config())
    assert public.http_url(uri) == f"https://cdn.example/from-settings/{key_for(IMAGE)}"
