""".ci/setup on a cluster: the CUDA build of torch comes from another index, given in TORCH_SPEC with
pip's own options (split into words, not one argument) or through PIP_INDEX_URL. Checked with real
pip and a real virtualenv against a local index that holds one wheel named torch (a stand-in for
the CUDA build, which cannot be downloaded here); `.ci/setup torch` stops once torch is in."""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


def local_index(root: Path) -> Path:
    """A PEP 503 index (file://) holding torch 0.0.1, whose __version__ says where it came from."""
    files = {"torch/__init__.py": "__version__ = '0.0.1+localindex'\n",
             "torch-0.0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: torch\nVersion: 0.0.1\n",
             "torch-0.0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for name, text in files.items()]
    files["torch-0.0.1.dist-info/RECORD"] = "\n".join([*record, "torch-0.0.1.dist-info/RECORD,,"]) + "\n"
    (root / "torch").mkdir(parents=True)
    wheel = "torch-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(root / "torch" / wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    (root / "torch" / "index.html").write_text(f'<html><body><a href="{wheel}">{wheel}</a></body></html>\n')
    return root


@pytest.mark.parametrize("how", ["TORCH_SPEC", "PIP_INDEX_URL"])
def test_the_torch_spec_reaches_pip_as_its_own_words(tmp_path, how):
    index = local_index(tmp_path / "index")
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "setup", checkout / ".ci" / "setup")
    env = dict(os.environ, PYTHON=getattr(sys, "_base_executable", sys.executable))
    env.pop("VIRTUAL_ENV", None)
    if how == "TORCH_SPEC":
        env["TORCH_SPEC"] = f"torch==0.0.1 --index-url {index.as_uri()}"
    else:
        env.update(TORCH_SPEC="torch==0.0.1", PIP_INDEX_URL=index.as_uri())
    proc = subprocess.run(["bash", ".ci/setup", "torch"], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "== ready: torch 0.0.1+localindex" in proc.stdout
