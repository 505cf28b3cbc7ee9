"""The BlobStore contract, run against every store - files, the table on SQLite and
on a real PostgreSQL server, and S3 (moto's emulator in server mode; a new backend
is added to the fixture and must pass the same tests) - and Object Lock on S3."""

from __future__ import annotations

import time

import pytest

from gateway.archive.store import ArchiveIndex, FileBlobStore, SqlBlobStore
from gateway.storage.database import StorageError
from gateway.storage.s3 import S3BlobStore
from tests.support.stores import opener


@pytest.fixture(params=["files", "sqlite", "postgresql", "s3"])
def store(tmp_path, request):
    if request.param == "s3":  # moto's emulator of S3 (tests.support.s3)
        s3 = request.getfixturevalue("s3")
        yield S3BlobStore(s3.client(), s3.bucket(object_lock=False), "records/", "off", 1)
        return
    if request.param == "postgresql":
        opened: list = []
        yield SqlBlobStore(opener("postgresql", request, tmp_path, opened)())
        for db in opened:
            db.close()
        return
    index = ArchiveIndex(tmp_path / "index.db")
    yield FileBlobStore(tmp_path / "blobs") if request.param == "files" else SqlBlobStore(index.db)
    index.close()


def test_put_get_replace_delete_and_names(store):
    assert store.get("msg-A") is None
    store.put("msg-A", b"\x00sealed\xff")
    store.put("msg-B", b"b", durable=False)
    store.make_durable_all(["msg-B"])
    assert store.get("msg-A") == b"\x00sealed\xff" and store.get("msg-B") == b"b"
    store.put("msg-A", b"again")  # a record journaled again replaces its blob whole
    assert store.get("msg-A") == b"again"
    assert sorted(store.names()) == ["msg-A", "msg-B"]
    assert store.delete("msg-A") is True and store.delete("msg-A") is False
    assert store.get("msg-A") is None and list(store.names()) == ["msg-B"]


def test_present_names_those_stored_among_many(store):
    names = [f"msg-{i:05d}" for i in range(510)]  # more than one IN list's worth
    for name in names[::7]:
        store.put(name, b"x", durable=False)
    assert store.present(names) == set(names[::7])
    assert store.present([]) == set() and store.present(["msg-none"]) == set()


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "a\\b", "x" * 201])
def test_names_that_are_not_record_ids_are_refused(store, name):
    with pytest.raises(ValueError, match="is not a blob name"):
        store.put(name, b"x")


def test_an_empty_blob_and_a_large_one_come_back_exactly(store):
    big = bytes(range(256)) * 40_000  # 10 MB
    store.put("copy-empty", b"")
    store.put("copy-big", big)
    assert store.get("copy-empty") == b"" and store.get("copy-big") == big


def test_a_file_blob_that_does_not_fit_leaves_nothing_behind(tmp_path):
    from gateway.durable import write_file
    from tests.support.fs import small_filesystem

    with small_filesystem(tmp_path / "tiny", "1m") as mount:
        blobs = FileBlobStore(mount / "blobs")
        blobs.put("msg-0123456789ABCDEF", b"kept" * 1000)
        with pytest.raises(OSError) as e:
            blobs.put("copy-" + "a" * 64, b"x" * (2 * 1024 * 1024))  # twice the disk
        assert e.value.errno == 28  # ENOSPC
        assert blobs.get("copy-" + "a" * 64) is None  # no truncated blob in its place
        assert sorted(p.name for p in (mount / "blobs").iterdir()) == ["msg-0123456789ABCDEF"]
        # an existing blob that cannot be replaced keeps its old content
        with pytest.raises(OSError):
            blobs.put("msg-0123456789ABCDEF", b"y" * (2 * 1024 * 1024))
        assert blobs.get("msg-0123456789ABCDEF") == b"kept" * 1000
        blobs.put("evt-1", b"small")  # and the store goes on
        assert blobs.get("evt-1") == b"small"
        # a secret made once is never overwritten
        write_file(mount / "key", b"first", replace=False)
        with pytest.raises(FileExistsError):
            write_file(mount / "key", b"second", replace=False)
        assert (mount / "key").read_bytes() == b"first"
        assert not [p for p in mount.iterdir() if p.name.endswith(".tmp")]


def test_an_object_locked_object_cannot_be_deleted_before_its_date(s3):
    bucket = s3.bucket(object_lock=True)
    store = S3BlobStore(s3.client(), bucket, "records/", "compliance", 2192)
    store.check()  # the bucket locks objects
    store.put("msg-LOCKED", b"sealed")
    head = s3.client().head_object(Bucket=bucket, Key="records/msg-LOCKED")
    assert head["ObjectLockMode"] == "COMPLIANCE"
    days = (head["ObjectLockRetainUntilDate"].timestamp() - time.time()) / 86400
    assert 2190 < days < 2192  # the retention, less a day
    with pytest.raises(StorageError, match="AccessDenied"):
        store.delete("msg-LOCKED")
    assert store.get("msg-LOCKED") == b"sealed"
    # a plain delete only hides it behind a marker: the content stays, locked
    s3.client().delete_object(Bucket=bucket, Key="records/msg-LOCKED")
    assert store.get("msg-LOCKED") is None  # and verify would report it gone
    versions = s3.client().list_object_versions(Bucket=bucket, Prefix="records/msg-LOCKED")
    assert len(versions["Versions"]) == 1


def test_a_bucket_without_object_lock_or_at_all_is_named(s3):
    plain = s3.bucket(object_lock=False)
    with pytest.raises(StorageError, match="Object Lock is not enabled on the bucket"):
        S3BlobStore(s3.client(), plain, "", "governance", 30).check()
    S3BlobStore(s3.client(), plain, "", "off", 30).check()
    with pytest.raises(StorageError, match="the bucket does not exist"):
        S3BlobStore(s3.client(), "no-such-bucket", "", "off", 30).check()
