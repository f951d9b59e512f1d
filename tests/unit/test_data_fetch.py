"""fetch against a real HTTP server on 127.0.0.1: download, sha256 pin, safe extraction."""

from __future__ import annotations

import os

import pytest

from dpscale.data import DataError
from dpscale.data.fetch import fetch
from dpscale.data.fetch import main as fetch_main
from dpscale.data.sources import index_source
from tests import datagen


@pytest.fixture
def served(tmp_path):
    """An Imagenette-like archive (train/ and val/ class folders) in a served folder."""
    tree = tmp_path / "src" / "nette"
    datagen.make_imagefolder(tree / "train", {"n02": 3, "n01": 2})
    datagen.make_imagefolder(tree / "val", {"n02": 1, "n01": 1})
    www = tmp_path / "www"
    www.mkdir()
    archive = datagen.make_archive(tree, www / "nette.tgz", "gztar")
    with datagen.http_server(www) as base:
        yield f"{base}/{archive.name}", datagen.sha256_file(archive)


def test_download_verify_extract_then_it_is_an_image_folder(tmp_path, served, umask022):
    url, sha = served
    raw = tmp_path / "resources" / "raw"
    extracted = fetch(url, sha, raw, log=lambda m: None)
    assert extracted == raw / "extracted"
    assert (raw / "nette.tar.gz").is_file() and (extracted / "nette" / "val" / "n01").is_dir()
    index = index_source("url", extracted)
    assert index.classes == ["n01", "n02"] and index.counts == [2, 3]
    assert index.root == str(extracted / "nette" / "train")
    assert sorted(os.listdir(tmp_path / "resources")) == ["raw"]  # no temp folder left
    assert raw.stat().st_mode & 0o777 == 0o755  # as mkdir() and open() give
    assert (raw / "nette.tar.gz").stat().st_mode & 0o777 == 0o644


def test_sha256_mismatch_fails_and_removes_the_file(tmp_path, served):
    url, sha = served
    wrong = "0" * 64
    with pytest.raises(SystemExit) as exc:
        fetch_main(["--url", url, "--sha256", wrong, "--out-dir", str(tmp_path / "d" / "raw")])
    msg = str(exc.value)
    assert msg == f"fetch: error: dataset.sha256: {url} has sha256 {sha}; expected {wrong} " + (
        "(the downloaded file was removed)"
    )
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").rglob("*"))


def test_unreachable_url_is_a_clear_error(tmp_path, served):
    url, sha = served
    with pytest.raises(DataError, match=r"dataset.url: cannot download .*missing.tgz"):
        fetch(url.rsplit("/", 1)[0] + "/missing.tgz", sha, tmp_path / "raw", log=lambda m: None)
    with pytest.raises(DataError, match=r"expected an http://, https:// or file:// URL"):
        fetch("ftp://example.org/x.tgz", sha, tmp_path / "raw", log=lambda m: None)


@pytest.mark.parametrize("member", ["../escaped.jpg", "/tmp/absolute.jpg", "a/../../up.jpg"])
def test_path_traversal_is_refused_before_writing(tmp_path, member):
    evil = datagen.make_traversal_tar(tmp_path / "evil.tgz", member)
    with pytest.raises(DataError, match=r"unsafe member path"):
        fetch(evil.as_uri(), datagen.sha256_file(evil), tmp_path / "x" / "raw", log=print)
    assert not (tmp_path / "escaped.jpg").exists() and not (tmp_path / "x" / "raw").exists()
    assert not list((tmp_path / "x").glob("*/extracted"))


def test_zip_over_file_url(tmp_path):
    tree = datagen.make_imagefolder(tmp_path / "flowers", {"rose": 2, "tulip": 2}, ext=".png")
    archive = datagen.make_archive(tree, tmp_path / "flowers.zip", "zip")
    extracted = fetch(archive.as_uri(), datagen.sha256_file(archive), tmp_path / "raw", print)
    index = index_source("url", extracted)
    assert index.classes == ["rose", "tulip"] and index.counts == [2, 2]


def test_not_an_archive(tmp_path):
    junk = datagen.garbage(tmp_path / "junk.bin", n=1000)
    with pytest.raises(DataError, match="not a tar or zip archive"):
        fetch(junk.as_uri(), datagen.sha256_file(junk), tmp_path / "raw", log=print)
