"""s3 - the archive's content in S3-compatible object storage (AWS S3, MinIO, Ceph),
optionally under Object Lock: the write-once storage regulators accept for
retention, where not even an administrator of the account can remove a record before
its date (``compliance`` mode).

A blob is an object ``<prefix><name>``.  With Object Lock each put carries the lock
mode and a retain-until date of ``archive.retention_days`` (at least the floor) from
now, less a day: a message is never purged before that many days after it arrived,
so a lawful purge finds its objects unlocked.  The bucket keeps versions (Object
Lock requires it): a delete removes every version of the object, and a version
still locked refuses - which is the point.  A delete marker someone else placed
hides the content from `get`, and `Archive.verify` reports it gone.

Blocking calls (boto3), made from the archive's thread.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

from gateway.archive.store import check_name
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.storage.database import StorageError

DAY = 86400.0
MISSING = ("NoSuchKey", "404", "NotFound")  # the error codes of an object that is not there


class S3BlobStore:
    def __init__(self, client: Any, bucket: str, prefix: str, lock: str, lock_days: int):
        self.client, self.bucket, self.prefix = client, bucket, prefix
        self.lock, self.lock_days = lock, lock_days

    @classmethod
    def from_config(cls, config: Config) -> S3BlobStore:
        bucket, prefix = split_url(config.storage.blobs)
        ac = config.archive
        return cls(
            client(config),
            bucket,
            prefix,
            config.storage.s3.object_lock,
            max(ac.retention_days, ac.retention_floor_days),
        )

    def _key(self, name: str) -> str:
        return self.prefix + check_name(name)

    def put(self, name: str, data: bytes, durable: bool = True) -> None:
        """Durable when S3 answers (``durable`` changes nothing here)."""
        extra: dict[str, Any] = {}
        if self.lock != "off":
            until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
                days=max(self.lock_days - 1, 1)
            )
            extra = {"ObjectLockMode": self.lock.upper(), "ObjectLockRetainUntilDate": until}
        self._call(
            "put",
            name,
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._key(name),
            Body=data,
            **extra,
        )

    def make_durable_all(self, names: list[str]) -> None:
        pass  # every put was durable when it returned

    def get(self, name: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as e:
            if _code(e) in MISSING:
                return None
            raise _error("get", name, e) from None
        except Exception as e:  # noqa: BLE001 - the endpoint cannot be reached
            raise _error("get", name, e) from None
        return bytes(answer["Body"].read())

    def present(self, names: list[str]) -> set[str]:
        """Those of ``names`` that are stored (HEAD each: nothing is read)."""
        from botocore.exceptions import ClientError

        found = set()
        for name in names:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            except ClientError as e:
                if _code(e) in MISSING:
                    continue
                raise _error("head", name, e) from None
            except Exception as e:  # noqa: BLE001 - the endpoint cannot be reached
                raise _error("head", name, e) from None
            found.add(name)
        return found

    def delete(self, name: str) -> bool:
        """Remove every version of the object (a locked one refuses: StorageError)."""
        key = self._key(name)
        versions = self._call(
            "delete", name, self.client.list_object_versions, Bucket=self.bucket, Prefix=key
        )
        found = [
            v
            for kind in ("Versions", "DeleteMarkers")
            for v in versions.get(kind, [])
            if v["Key"] == key
        ]
        had = any(v for v in versions.get("Versions", []) if v["Key"] == key)
        for version in found:
            self._call(
                "delete",
                name,
                self.client.delete_object,
                Bucket=self.bucket,
                Key=key,
                VersionId=version["VersionId"],
            )
        return had

    def names(self) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix) :]

    def _call(self, what: str, name: str, fn: Any, **args: Any) -> Any:
        try:
            return fn(**args)
        except Exception as e:  # noqa: BLE001 - said as a StorageError with the reason
            raise _error(what, name, e) from None

    # -- checks -------------------------------------------------------------------------

    def check(self) -> None:
        """That the bucket is there and, when configured, locks objects
        (StorageError saying which is not so)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _code(e) in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"s3://{self.bucket}: the bucket does not exist") from None
            raise _error("open", self.bucket, e) from None
        except Exception as e:  # noqa: BLE001
            raise _error("open", self.bucket, e) from None
        if self.lock == "off":
            return
        try:
            answer = self.client.get_object_lock_configuration(Bucket=self.bucket)
            enabled = answer["ObjectLockConfiguration"].get("ObjectLockEnabled") == "Enabled"
        except ClientError:
            enabled = False
        if not enabled:
            raise StorageError(
                f"s3://{self.bucket}: Object Lock is not enabled on the bucket "
                "(storage.s3.object_lock needs a bucket made with Object Lock)"
            )


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix ending in ``/`` or empty)."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def client(config: Config) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    s3 = config.storage.s3
    secret = None
    if s3.secret_access_key_file is not None:
        try:
            secret = s3.secret_access_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                "storage.s3.secret_access_key_file",
                f"cannot read {s3.secret_access_key_file}: {e}",
            ) from None
    if (s3.access_key_id is None) != (secret is None):
        raise ConfigError(
            "storage.s3.access_key_id",
            "set storage.s3.access_key_id and storage.s3.secret_access_key_file together",
        )
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        region_name=s3.region,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=secret,
        config=BotoConfig(
            connect_timeout=10,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
    )


def _code(error: Any) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def _error(what: str, name: str, error: BaseException) -> StorageError:
    code = _code(error)
    if code:
        message = getattr(error, "response", {}).get("Error", {}).get("Message", "")
        return StorageError(f"object storage: {what} {name}: {code} {message}".rstrip())
    return StorageError(f"object storage: {what} {name}: {error}")
