"""Engine checks added while mutation testing (issue 15): behaviour the other tests left loose."""

from __future__ import annotations

from influence_over_inference.engine.hashing import file_sha256


def test_file_sha256_is_the_files_sha256_prefix(tmp_path):
    import hashlib

    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 5000  # > one 1 MiB read block
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()[:16]
    assert file_sha256(path, length=40) == hashlib.sha256(data).hexdigest()[:40]
