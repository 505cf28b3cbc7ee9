"""The BlobStore contract, run against every store (a new backend - S3 with Object
Lock, say - is added to STORES and must pass the same tests)."""

from __future__ import annotations

import pytest

from gateway.archive.store import ArchiveIndex, FileBlobStore, SqliteBlobStore


@pytest.fixture(params=["files", "sqlite"])
def store(tmp_path, request):
    index = ArchiveIndex(tmp_path / "index.db")
    yield (
        FileBlobStore(tmp_path / "blobs") if request.param == "files" else SqliteBlobStore(index.db)
    )
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


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "a\\b", "x" * 201])
def test_names_that_are_not_record_ids_are_refused(store, name):
    with pytest.raises(ValueError, match="is not a blob name"):
        store.put(name, b"x")


def test_an_empty_blob_and_a_large_one_come_back_exactly(store):
    big = bytes(range(256)) * 40_000  # 10 MB
    store.put("copy-empty", b"")
    store.put("copy-big", big)
    assert store.get("copy-empty") == b"" and store.get("copy-big") == big
