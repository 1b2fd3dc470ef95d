"""Where the original objects (the uploaded images and audio) live: a local folder or an S3 bucket.

Vectors carry the object's URI, never its bytes; ``http_url`` turns that URI into something a
browser can load, so search results show originals without the server relaying them.
"""

from __future__ import annotations

import mimetypes
import os
import re
import stat
import threading
import uuid
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import boto3.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from mmembed.store.config import ObjectsConfig


class ObjectStoreError(Exception):
    """An object could not be stored or read; the message names the object and what to check."""


class ObjectNotFound(ObjectStoreError):
    """No object at that URI (a subclass, so callers can answer 404 rather than 500)."""


class ObjectStore(ABC):
    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Stores ``data`` under ``key`` (replacing what was there) and returns the object's URI."""

    @abstractmethod
    def get(self, uri: str) -> bytes: ...

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Idempotent: deleting a missing object is not an error."""

    @abstractmethod
    def exists(self, uri: str) -> bool: ...

    @abstractmethod
    def http_url(self, uri: str) -> str: ...


def _check_key(key: str) -> None:
    """Keys are relative paths of plain names, so a key can never reach outside the folder or
    bucket prefix, and a URL built from it means the same object after a browser normalises it."""
    parts = key.split("/")
    if not key or "\0" in key or any(part in ("", ".", "..") or len(part.encode()) > 255 for part in parts):
        raise ObjectStoreError(
            f"invalid object key {key[:300]!r}: keys are relative paths like 'ab/abcdef.png' "
            "(no leading '/', no empty, '.' or '..' parts, no part over 255 bytes)"
        )


class LocalObjects(ObjectStore):
    """Objects as files under ``root``; the HTTP ingress serves ``{public_base}/{key}`` from there."""

    def __init__(self, root: Path, public_base: str = "/objects") -> None:
        self.root = Path(root).expanduser().resolve()
        self.public_base = public_base.rstrip("/")

    def path_for(self, key: str) -> Path:
        _check_key(key)
        path = self.root / key
        # A symlink inside the folder could still lead out of it.
        if self._through_a_link(key) and not path.resolve().is_relative_to(self.root):
            raise ObjectStoreError(f"object key {key!r} resolves outside the object folder {self.root}")
        return path

    def _through_a_link(self, key: str) -> bool:
        """Whether a part of ``key`` below the (resolved) root is a symlink: the key's plain names can
        lead nowhere else. One ``lstat`` per part of the key, where resolving the whole path, done for
        every object a bulk job writes, also takes one per part of the root."""
        current = str(self.root)
        for part in key.split("/"):
            current = os.path.join(current, part)
            try:
                if stat.S_ISLNK(os.lstat(current).st_mode):
                    return True
            except FileNotFoundError:  # nothing exists below a missing part
                return False
        return False

    def put(self, key: str, data: bytes, content_type: str) -> str:
        path = self.path_for(key)
        # Write a sibling, then rename over the key: a reader never sees half an object, and two
        # writers of one content-addressed key leave the same bytes whoever wins.
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            try:
                partial.write_bytes(data)
            except FileNotFoundError:  # its folder's first object (one mkdir per folder, not per put)
                path.parent.mkdir(parents=True, exist_ok=True)
                partial.write_bytes(data)
            partial.replace(path)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise ObjectStoreError(f"cannot write {path}: {e.strerror}; check that {self.root} is writable") from e
        return "file://" + str(path)

    def get(self, uri: str) -> bytes:
        path = self._path_of(uri)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError) as e:
            raise ObjectNotFound(f"no object at {uri}") from e
        except OSError as e:
            raise ObjectStoreError(f"cannot read {path}: {e.strerror}; check its permissions") from e

    def delete(self, uri: str) -> None:
        path = self._path_of(uri)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise ObjectStoreError(f"cannot delete {path}: {e.strerror}; check its permissions") from e

    def exists(self, uri: str) -> bool:
        return self._path_of(uri).is_file()

    def http_url(self, uri: str) -> str:
        return f"{self.public_base}/{quote(self._key_of(uri))}"

    def _key_of(self, uri: str) -> str:
        """Only URIs of files in this folder: a URI read back from a payload must not open any file."""
        if not uri.startswith("file:///"):
            raise ObjectStoreError(f"{uri!r} is not a file:// URI of a local object under {self.root}")
        path = PurePosixPath(uri.removeprefix("file://"))
        if not path.is_relative_to(self.root):
            raise ObjectStoreError(f"{uri!r} is outside this object folder {self.root}")
        key = path.relative_to(self.root).as_posix()
        _check_key(key)
        return key

    def _path_of(self, uri: str) -> Path:
        return self.path_for(self._key_of(uri))


# Codes with which S3 and its look-alikes answer a missing object or bucket.
_MISSING = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_CREDENTIALS = {"403", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken"}
_REGION = {"301", "PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class S3Objects(ObjectStore):
    """Objects in an S3 bucket (AWS, MinIO, SeaweedFS, ...) under ``prefix``.

    Credentials come from boto3's usual chain (environment, shared config, instance role), so
    none is ever written into settings files.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "mmembed/",
        endpoint_url: str | None = None,
        region: str | None = None,
        public_base_url: str | None = None,
        presign_seconds: int = 3600,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        # "mmembed" means the folder mmembed/, not keys glued onto "mmembed".
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.region = region
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.presign_seconds = presign_seconds
        config = Config(
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=5,
            read_timeout=60,
            signature_version="s3v4",
            # Self-hosted servers answer at endpoint/bucket/key (bucket.endpoint would need DNS per bucket).
            # On AWS, virtual hosts give presigned URLs the regional host: the global one redirects new
            # buckets outside us-east-1 for a while, and a redirect breaks the signature.
            s3={"addressing_style": "path" if endpoint_url else "virtual"},
        )
        # A session of its own: boto3's default session caches the first credentials it finds for
        # the whole process, so a store made after the environment changed would sign with stale ones.
        self.client = client or boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self._bucket_ready = False
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes, content_type: str) -> str:
        _check_key(key)
        self._ensure_bucket()
        full_key = self.prefix + key
        try:
            self.client.put_object(Bucket=self.bucket, Key=full_key, Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as e:
            raise self._error("write", full_key, e) from e
        return f"s3://{self.bucket}/{full_key}"

    def get(self, uri: str) -> bytes:
        full_key = self._key_of(uri)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=full_key)["Body"].read()
        except ClientError as e:
            if _code(e) in _MISSING:
                raise ObjectNotFound(f"no object at {uri}") from e
            raise self._error("read", full_key, e) from e
        except BotoCoreError as e:
            raise self._error("read", full_key, e) from e

    def delete(self, uri: str) -> None:
        full_key = self._key_of(uri)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full_key)
        except ClientError as e:
            if _code(e) not in _MISSING:
                raise self._error("delete", full_key, e) from e
        except BotoCoreError as e:
            raise self._error("delete", full_key, e) from e

    def exists(self, uri: str) -> bool:
        """On AWS, credentials without s3:ListBucket get 403 rather than 404 for a missing key: an error here."""
        full_key = self._key_of(uri)
        try:
            self.client.head_object(Bucket=self.bucket, Key=full_key)
        except ClientError as e:
            if _code(e) in _MISSING:
                return False
            raise self._error("look up", full_key, e) from e
        except BotoCoreError as e:
            raise self._error("look up", full_key, e) from e
        return True

    def http_url(self, uri: str) -> str:
        """The public base stands for the bucket's root, so the URL carries the whole object key, prefix included."""
        full_key = self._key_of(uri)
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(full_key)}"
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full_key}, ExpiresIn=self.presign_seconds
            )
        except (ClientError, BotoCoreError) as e:
            raise self._error("sign a URL for", full_key, e) from e

    def _key_of(self, uri: str) -> str:
        """Only URIs in this bucket: another bucket's URI in a payload is a mistake, never a redirect."""
        start = f"s3://{self.bucket}/"
        if not uri.startswith(start) or uri == start:
            raise ObjectStoreError(f"{uri!r} is not an object URI in bucket {self.bucket!r} (expected {start}KEY)")
        return uri.removeprefix(start)

    def _ensure_bucket(self) -> None:
        """Creates the bucket on first write; with credentials that may only use an existing bucket
        (no s3:CreateBucket), the head request finds it and nothing is created."""
        if self._bucket_ready:
            return
        with self._lock:
            if self._bucket_ready:
                return
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                if _code(e) not in _MISSING:
                    raise self._error("open", None, e) from e
                self._create_bucket()
            except BotoCoreError as e:
                raise self._error("open", None, e) from e
            self._bucket_ready = True

    def _create_bucket(self) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket}
        if self.region and self.region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**args)
        except ClientError as e:
            if _code(e) != "BucketAlreadyOwnedByYou":
                raise self._error("create", None, e) from e
        except BotoCoreError as e:
            raise self._error("create", None, e) from e

    def _error(self, action: str, full_key: str | None, error: Exception) -> ObjectStoreError:
        what = f"s3://{self.bucket}/{full_key}" if full_key else f"bucket {self.bucket!r}"
        where = self.endpoint_url or "AWS S3"
        if isinstance(error, ClientError):
            code = _code(error)
            detail = f"{code} {error.response.get('Error', {}).get('Message', '')}".strip()
            if code in _CREDENTIALS:
                hint = (
                    "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) "
                    "and that they may use this bucket at this endpoint"
                )
            elif code in _REGION:
                hint = "check the region (MMEMBED_S3_REGION) matches the bucket's"
            elif code == "BucketAlreadyExists":
                hint = "that bucket name belongs to another account: choose another MMEMBED_S3_BUCKET"
            else:
                hint = "check the bucket name, the endpoint and the credentials"
        elif isinstance(error, NoCredentialsError):
            detail = "no credentials found"
            hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        elif isinstance(error, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
            detail = str(error)
            hint = "check the endpoint URL (MMEMBED_S3_ENDPOINT_URL) and that the server is up"
        else:
            detail = str(error)
            hint = "check the endpoint, the region and the credentials"
        return ObjectStoreError(f"cannot {action} {what} at {where}: {detail.rstrip('.')}; {hint}")


_HASH = re.compile(r"[0-9a-f]{32,}")
_EXTENSION = re.compile(r"\.[a-z0-9]{1,10}")
# Python's built-in table only, not /etc/mime.types: the same bytes get the same key on every
# machine. Plus the media types the loaders accept that the table lacks.
_MEDIA_TYPES = mimetypes.MimeTypes()
for _type, _ext in [
    ("image/webp", ".webp"),
    ("audio/wav", ".wav"),
    ("audio/wave", ".wav"),
    ("audio/vnd.wave", ".wav"),
    ("audio/flac", ".flac"),
    ("audio/x-flac", ".flac"),
    ("audio/mp4", ".m4a"),
    ("audio/x-m4a", ".m4a"),
    ("audio/ogg", ".ogg"),
    ("application/ogg", ".ogg"),
    ("audio/opus", ".opus"),
    ("audio/webm", ".webm"),
]:
    _MEDIA_TYPES.add_type(_type, _ext)


def object_key(content_hash: str, filename: str | None, content_type: str) -> str:
    """Content-addressed key ``ab/abcdef....ext``, so identical bytes are stored once and keys never collide.

    The extension (which lets the ingress serve the right Content-Type) comes from the content
    type first, so the same bytes named ``a.jpeg`` and ``b.JPG`` still share one object; the
    filename's extension is the fallback for types the table doesn't know.
    """
    if not _HASH.fullmatch(content_hash):
        raise ValueError(f"content_hash must be a lowercase hex digest of at least 128 bits, got {content_hash!r}")
    media_type = content_type.split(";")[0].strip().lower()
    ext = _MEDIA_TYPES.guess_extension(media_type) if media_type != "application/octet-stream" else None
    if not ext and filename:
        suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
        ext = suffix if _EXTENSION.fullmatch(suffix) else None
    return f"{content_hash[:2]}/{content_hash}{ext or ''}"


def object_store(config: ObjectsConfig) -> ObjectStore:
    if config.s3_bucket:
        return S3Objects(
            config.s3_bucket,
            config.s3_prefix,
            config.s3_endpoint_url,
            config.s3_region,
            config.s3_public_base_url,
            config.s3_presign_seconds,
        )
    return LocalObjects(config.path)
