"""dpscale.atomic on the real filesystem: modes as open() gives, all-or-nothing, round trips."""

from __future__ import annotations

import glob
import json
import math
import os
import stat

import numpy as np
import pytest

from dpscale import atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _open_mode(folder) -> int:
    """The mode open() gives a new file in `folder` under the current umask (and its ACLs)."""
    ref = folder / "made-by-open"
    with open(ref, "w"):
        pass
    mode = _mode(ref)
    ref.unlink()
    return mode


def test_every_writer_gives_the_mode_open_gives(tmp_path, umask):
    expected = 0o666 & ~umask
    assert _open_mode(tmp_path) == expected  # no default ACL here to change the rule
    atomic.write_text(tmp_path / "a.csv", "x\n")
    atomic.write_json(tmp_path / "b.json", {"x": 1})
    atomic.write_npz(tmp_path / "c.npz", {"x": np.arange(2)})
    with atomic.replacing(tmp_path / "d.svg") as tmp:
        tmp.write_text("<svg/>")
    for name in ("a.csv", "b.json", "c.npz", "d.svg"):
        assert _mode(tmp_path / name) == expected, name
    with atomic.replacing_dir(tmp_path / "raw") as tmp:
        (tmp / "f").write_text("x")
    assert _mode(tmp_path / "raw") == 0o777 & ~umask


def test_replacing_a_private_file_gives_the_umask_mode(tmp_path, umask022):
    old = tmp_path / "summary.csv"
    old.write_text("old\n")
    old.chmod(0o600)
    atomic.write_text(old, "new\n")
    assert _mode(old) == 0o644 and old.read_text() == "new\n"


def test_temporary_name_is_hidden_beside_the_target(tmp_path):
    target = tmp_path / "out" / "metrics.json"  # the folder is made on demand
    with atomic.replacing(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".metrics.json.")
        assert tmp.name.endswith(".tmp") and tmp.exists() and not target.exists()
        assert glob.glob(str(target.parent / "*")) == []  # glob and shells skip dot files
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="killed"), atomic.replacing(target) as tmp:
        tmp.write_text("half a ne")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_failure_without_an_old_file_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic.write_json(tmp_path / "eps.json", {"epsilon": math.nan}, strict=True)
    assert list(tmp_path.iterdir()) == []


def test_json_conventions_round_trip(tmp_path):
    obj = {"z": math.inf, "a": np.float32(0.5), "n": np.int64(3), "l": [math.nan, 1.0, (2, 3)]}
    atomic.write_json(tmp_path / "m.json", obj)
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"z": None, "a": 0.5, "n": 3, "l": [None, 1.0, [2, 3]]}
    assert text.startswith('{\n  "z": null,\n  "a": 0.5') and text.endswith("}\n")
    atomic.write_json(tmp_path / "s.json", {"b": 1.5, "a": None}, strict=True)
    assert json.loads((tmp_path / "s.json").read_text()) == {"b": 1.5, "a": None}


def test_text_is_utf8_with_newlines_as_given(tmp_path):
    atomic.write_text(tmp_path / "t.csv", "ε,δ\r\n1,2\n")
    assert (tmp_path / "t.csv").read_bytes() == "ε,δ\r\n1,2\n".encode()


def test_npz_round_trip_keeps_the_name(tmp_path):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.array([1, 0])}
    atomic.write_npz(tmp_path / "weights.npz", arrays)
    atomic.write_npz(tmp_path / "state", arrays)  # np.savez(path) would write state.npz
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state", "weights.npz"]
    for name in ("weights.npz", "state"):
        with np.load(tmp_path / name) as z:
            assert sorted(z.files) == ["w", "y"]
            np.testing.assert_array_equal(z["w"], arrays["w"])
            np.testing.assert_array_equal(z["y"], arrays["y"])


def test_replacing_dir_swaps_a_full_folder_and_cleans_up(tmp_path):
    out = tmp_path / "raw"
    (out / "old").mkdir(parents=True)
    (out / "old" / "a.jpg").write_text("old")
    with atomic.replacing_dir(out) as tmp:
        assert tmp.name.startswith(".raw.") and out.exists()  # the old one stays until the end
        (tmp / "extracted").mkdir()
        (tmp / "extracted" / "b.jpg").write_text("new")
    assert [p.relative_to(out).as_posix() for p in sorted(out.rglob("*"))] == [
        "extracted",
        "extracted/b.jpg",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_replacing_dir_failure_keeps_the_old_folder(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "a.jpg").write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic.replacing_dir(out) as tmp:
        (tmp / "b.jpg").write_text("half")
        raise OSError("disk full")
    assert [p.name for p in out.iterdir()] == ["a.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
