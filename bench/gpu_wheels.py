"""The wheels a GPU session carries to the device machine: what the launcher imports there that the
machine's image lacks, for the image's Python, and proof that they are whole.

    python bench/gpu_wheels.py                       # .whl/ for the image (CPython 3.12, manylinux x86-64)
    python bench/gpu_wheels.py --python-version 3.11 --out /tmp/whl   # for this machine (the rehearsal)

DeepSpeed is built here as a pure-Python wheel (no JIT op built ahead: the launcher uses torch's
fused AdamW); its pydantic and hjson, and `datasets` (the data preparation) with its own needs, are
downloaded. Each carried wheel's requirements (markers evaluated for that Python on Linux) must be
met by another carried wheel of a matching version, or by the image (bench/gpu_image.txt, version
checked where known); a carried wheel pinned to another's version fetches that version. `.whl/old`
holds datasets 3.6 and its needs, which bench/gpu_session.sh installs instead where the image's
pyarrow is too old for the newest. Exit status 1, naming each requirement, if any is left unmet.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = "deepspeed==0.19.8"  # as requirements.txt pins it
CARRIED = ["hjson", "pydantic", "annotated-types", "typing-inspection", "typing-extensions", "datasets"]
OLD = ["datasets==3.6.0", "dill==0.3.8", "multiprocess==0.70.16"]  # pyarrow >= 15
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def image_packages(path: Path) -> dict[str, Version | None]:
    """bench/gpu_image.txt: name -> version where known."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = Version(version) if version else None
    return found


def download(specs: list[str], out: Path, python_version: str) -> None:
    native = python_version == platform.python_version().rsplit(".", 1)[0]
    target = [] if native else ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
                                *[f"--platform={p}" for p in PLATFORMS]]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                    *target, "-d", str(out), *specs], check=True)


def build_deepspeed(out: Path) -> None:
    """DeepSpeed publishes only a source archive; its setup imports torch, so it builds against this
    environment's (no build isolation) and with no op compiled ahead (DS_BUILD_OPS=0)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "-w", str(out), DEEPSPEED],
                   check=True, env={**os.environ, "DS_BUILD_OPS": "0"})


def wheels(folder: Path) -> dict[str, tuple[Version, Path]]:
    found = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        found[name] = (version, path)
    return found


def requirements(path: Path, python_version: str) -> list[Requirement]:
    """A wheel's Requires-Dist, those whose markers hold for `python_version` on Linux (no extras)."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = z.read(meta).decode()
    env = {**default_environment(), "python_version": python_version, "python_full_version": python_version + ".0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def unmet(folder: Path, image: dict[str, Version | None], python_version: str) -> tuple[list[str], list[str]]:
    """(requirements a carried wheel of the wrong version or none at all could meet: to fetch,
    requirements nothing here can meet: the image's version is outside them)."""
    carried, fetch, conflicts = wheels(folder), [], []
    for name, (version, path) in carried.items():
        for req in requirements(path, python_version):
            dep = canonicalize_name(req.name)
            if dep in carried:
                if not req.specifier.contains(carried[dep][0], prereleases=True):
                    fetch.append(f"{dep}{req.specifier}")
            elif dep in image:
                known = image[dep]
                if known is not None and not req.specifier.contains(known, prereleases=True):
                    conflicts.append(f"{name} {version} needs {req}; the image has {dep} {known}")
            else:
                fetch.append(f"{dep}{req.specifier}")
    return sorted(set(fetch)), conflicts


def complete(folder: Path, specs: list[str], image: dict[str, Version | None], python_version: str) -> list[str]:
    """Download `specs`, then what their wheels still need, until nothing more is fetched; the
    requirements left unmet."""
    download(specs, folder, python_version)
    for _ in range(5):
        fetch, conflicts = unmet(folder, image, python_version)
        if not fetch:
            return conflicts
        for spec in fetch:  # a wrong version of a carried wheel is replaced, never kept beside the right one
            for path in folder.glob(f"{canonicalize_name(Requirement(spec).name).replace('-', '_')}-*.whl"):
                path.unlink()
        download(fetch, folder, python_version)
    fetch, conflicts = unmet(folder, image, python_version)
    return [f"still unmet after 5 rounds: {spec}" for spec in fetch] + conflicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / ".whl"), help="folder for the wheels (default: .whl, git-ignored)")
    parser.add_argument("--python-version", default="3.12", help="the device image's Python (KINDS.md: 3.12.3)")
    parser.add_argument("--image", default=str(REPO / "bench/gpu_image.txt"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "old").mkdir(parents=True, exist_ok=True)
    image = image_packages(Path(args.image))
    build_deepspeed(out)
    problems = complete(out, CARRIED, image, args.python_version)
    problems += [f"old/: {p}" for p in complete(out / "old", OLD, image, args.python_version)]
    total = sum(p.stat().st_size for p in out.rglob("*.whl"))
    for folder in (out, out / "old"):
        print(f"{folder}: " + ", ".join(f"{n} {v}" for n, (v, _) in wheels(folder).items()))
    print(f"{total / 2**20:.1f} MiB to carry (the device tool's limit: 64 MiB with the working tree)")
    for problem in problems:
        print(f"UNMET: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
