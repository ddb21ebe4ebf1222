"""What .ci/gpu_prepare.sh carries to an offline GPU machine, checked before it travels.

    python .ci/gpu_payload.py closure PAYLOAD     every requirement of memcli, of llama-cpp-python and of each carried
                                                 wheel is met by a carried wheel or by the device image
    python .ci/gpu_payload.py size PAYLOAD       the bytes that travel: the checkout's tracked and untracked-not-ignored
                                                 files plus PAYLOAD; prints the breakdown, last line `payload: N MiB`

The device image (KINDS.md of the device tool, read 2026-11-17; the issue's list) has Python 3.12 with torch 2.11,
transformers 5.17, peft, typer, rich, numpy, scipy, nanobind, scikit-build-core, cmake and ninja; IMAGE below
names what this check counts on it having. A requirement met by neither fails the check here, not there.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

IMAGE = {canonicalize_name(n) for n in """torch transformers peft typer rich numpy scipy nanobind scikit-build-core
    cmake ninja safetensors pyyaml tqdm jinja2 markupsafe typing-extensions packaging requests huggingface-hub
    tokenizers regex filelock fsspec click pathspec""".split()}
# llama-cpp-python 0.3.36's own requirements (its sdist's pyproject.toml), built there from the carried sdist
LLAMA_CPP_REQUIRES = ["typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3"]
# the interpreter the wheels are for: CPython 3.12 on x86-64 Linux
DEVICE_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}
REPO = Path(__file__).resolve().parents[1]


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []


def fits_device(wheel: Path) -> bool:
    """A wheel pip installs on CPython 3.12, x86-64 manylinux."""
    _, _, _, tags = parse_wheel_filename(wheel.name)
    return any(t.interpreter in ("py3", "cp312") and t.abi in ("none", "abi3", "cp312")
               and (t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("x86_64")))
               for t in tags)


def closure(payload: Path) -> int:
    wheels = {}
    for w in sorted((payload / "wheels").glob("*.whl")):
        name = canonicalize_name(parse_wheel_filename(w.name)[0])
        if name in wheels:
            print(f"two wheels of {name}: {wheels[name].name}, {w.name} (pip refuses the install)")
            return 1
        if not fits_device(w):
            print(f"{w.name} does not install on CPython 3.12 x86-64")
            return 1
        wheels[name] = w
    memcli = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    sources = [("memcli", memcli), ("llama-cpp-python", LLAMA_CPP_REQUIRES)]
    sources += [(w.name, wheel_requirements(w)) for w in wheels.values()]
    missing = []
    print(f"{'requirement':<34} {'of':<46} met by")
    for owner, reqs in sources:
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**DEVICE_ENV, "extra": ""}):
                continue  # an extra's, or another platform's
            name = canonicalize_name(req.name)
            if name == "llama-cpp-python":
                met = "the carried sdist, built there"
            elif name in wheels:
                met = f"carried {wheels[name].name}"
            elif name in IMAGE:
                met = "the image"
            else:
                met = "NOTHING"
                missing.append(f"{text} (of {owner})")
            print(f"{text:<34} {owner[:46]:<46} {met}")
    if missing:
        print("not met on the device:", "; ".join(missing))
        return 1
    print(f"closure: every requirement met ({len(wheels)} wheels carried)")
    return 0


def size(payload: Path) -> int:
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout.split(b"\0")
    project = sum((REPO / p.decode()).stat().st_size for p in tracked if p and (REPO / p.decode()).is_file())
    parts = {}
    for p in payload.rglob("*"):
        if p.is_file():
            top = p.relative_to(payload).parts[0]
            parts[top] = parts.get(top, 0) + p.stat().st_size
    mib = 1 << 20
    print(f"  the checkout (tracked and untracked-not-ignored files): {project / mib:.1f} MiB")
    for top, n in sorted(parts.items()):
        print(f"  {payload.name}/{top}: {n / mib:.1f} MiB")
    largest = max((p for p in payload.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    print(f"  largest carried file: {largest.relative_to(payload)} ({largest.stat().st_size / mib:.1f} MiB)")
    total = project + sum(parts.values())
    n = -(-total // mib)  # rounded up
    print(f"payload: {n} MiB")
    return 0 if n < 60 else 1


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    sys.exit({"closure": closure, "size": size}[command](folder))
