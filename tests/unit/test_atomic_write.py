"""Atomic writes: the target appears whole or not at all, with the permissions a plain open() would give."""

import os

import pytest

from maskaq_deploy.calib.checkpoint import atomic_path, atomic_write_bytes


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_file_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_bytes() == b"{}"
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
