"""The asset step copies from a local mirror, checks what it got, and is idempotent."""

import shutil
import subprocess
import sys

from conftest import ASSETS, ROOT


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_assets.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_mirror_copy_then_idempotent(tmp_path):
    dest = tmp_path / "assets"
    first = run("--mirror", ASSETS, "--dest", dest)
    assert first.returncode == 0, first.stderr
    assert (dest / "models" / "yolox_nano.onnx").stat().st_size == (ASSETS / "models" / "yolox_nano.onnx").stat().st_size
    assert first.stdout.count("fetched") == 5
    second = run("--mirror", ASSETS, "--dest", dest)
    assert second.returncode == 0 and second.stdout.count("ok ") == 5


def test_a_bad_mirror_file_is_refused(tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(ASSETS, mirror)
    (mirror / "models" / "yolox_nano.onnx").chmod(0o644)
    (mirror / "models" / "yolox_nano.onnx").write_bytes(b"x" * 2_000_000)
    result = run("--mirror", mirror, "--dest", tmp_path / "assets")
    assert result.returncode == 1
    assert "models/yolox_nano.onnx: not an ONNX model" in result.stderr
    assert not (tmp_path / "assets" / "models" / "yolox_nano.onnx").exists()
