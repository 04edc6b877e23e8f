"""vchat/io.py's atomic writers: the target appears whole or not at all, an older one survives a failed
write, and no temporary is left behind."""

import os

import pytest

from vchat.io import writing_dir, writing_file


def test_writing_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "sub" / "report.json"
    with writing_file(str(path)) as f:
        f.write("first")
        assert not path.exists()  # nothing at the target while writing
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError):
        with writing_file(str(path)) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "first"  # the older file survives
    with writing_file(str(path), "wb") as f:
        f.write(b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert os.listdir(path.parent) == ["report.json"]  # no temporary left


def test_writing_dir_replaces_only_on_success(tmp_path):
    path = tmp_path / "ckpt"
    with writing_dir(str(path)) as tmp:
        open(os.path.join(tmp, "a"), "w").close()
    assert os.listdir(path) == ["a"]
    with pytest.raises(RuntimeError):
        with writing_dir(str(path)) as tmp:
            open(os.path.join(tmp, "b"), "w").close()
            raise RuntimeError("killed")
    assert os.listdir(path) == ["a"] and os.listdir(tmp_path) == ["ckpt"]
