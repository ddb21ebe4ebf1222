"""How memcli talks to the llama.cpp library: loading it (version check, log capture) and loading models safely.

Safe loading. `pip install llama-cpp-python` builds llama.cpp for the CPU it is built on (GGML_NATIVE). On an
Intel CPU with AMX that build compiles llama.cpp's AMX matrix kernels and, by default, puts quantised weights
in the AMX "extra buffer type". On hosts whose kernel does not grant the AMX tile state to llama.cpp's worker
threads, the first quantised matrix product then dies with SIGILL (`tilezero` in ggml_backend_amx_mul_mat):
the whole process is killed, with no Python exception to catch. Loading the model with
`llama_model_params.use_extra_bufts = False` keeps llama.cpp on its plain CPU buffers, which works.

So before the first load of a model on a machine that could take that path (the CPU reports AMX, or
MEMCLI_LLAMA_PROBE=always), memcli runs a probe in a child process: load the model with the default settings
and decode a few tokens. If the child dies by a signal, memcli loads with extra buffer types off (and probes
that too: if it also dies, memcli stops with a clear message instead of dying). The verdict is cached per
(llama.cpp build, machine, the model's tensor types) in $MEMCLI_CACHE/llama-probe.json, so the probe runs once.
The path taken is recorded in verify's report (`backend.extra_bufts`, `backend.probe`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from memcli.core.errors import UserError
from memcli.core.models import cache_dir
from memcli.core.runs import write_json

LLAMA_CPP_VERSION = "0.3.36"  # the release whose C API memcli uses (pinned in pyproject.toml)
INSTALL_HINT = f"pip install --force-reinstall --no-deps llama-cpp-python=={LLAMA_CPP_VERSION}"
PROBE_ENV = "MEMCLI_LLAMA_PROBE"  # auto (default): probe where AMX is reported; always; never
PROBE_TIMEOUT_S = 300

_log_lines: collections.deque = collections.deque(maxlen=20)
_log_callback = None
_initialised = False
_said: set[str] = set()  # fallback notes already printed by this process
_captured: list[str] | None = None  # every log text while capture_log() is active


# --- the library ---------------------------------------------------------------------------------------------

def _check_api(L) -> None:
    """The C API memcli calls must be there: an older llama-cpp-python fails late or ignores fields silently."""
    import llama_cpp

    missing = [name for name in ("llama_set_adapters_lora", "llama_memory_clear", "llama_max_parallel_sequences")
               if not hasattr(L, name)]
    fields = {name for name, _ in L.llama_context_params._fields_}
    missing += [f"llama_context_params.{f}" for f in ("kv_unified", "n_outputs_max") if f not in fields]
    if "use_extra_bufts" not in {name for name, _ in L.llama_model_params._fields_}:
        missing.append("llama_model_params.use_extra_bufts")
    if missing:
        raise UserError(f"llama-cpp-python {llama_cpp.__version__} lacks {', '.join(missing)}; memcli needs "
                        f"{LLAMA_CPP_VERSION}: {INSTALL_HINT}")


def lib():
    """llama_cpp's ctypes module, checked and initialised once, its log routed into a small buffer (shown only
    in error messages)."""
    global _log_callback, _initialised
    try:
        from llama_cpp import llama_cpp as L
    except (ImportError, OSError) as e:
        raise UserError(f"llama-cpp-python cannot be loaded ({e}): {INSTALL_HINT}") from None

    if not _initialised:
        _check_api(L)
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

        @L.llama_log_callback
        def callback(level, text, user_data):
            if _captured is not None:
                _captured.append(text.decode("utf-8", "replace"))
            if level in (2, 3):  # warnings and errors; continuations (5) of them are rare enough to drop
                _log_lines.append(text.decode("utf-8", "replace").strip())

        _log_callback = callback  # keep a reference: llama.cpp holds the pointer
        L.llama_log_set(_log_callback, ctypes.c_void_p(0))
        L.llama_backend_init()
        _initialised = True
    return L


@contextlib.contextmanager
def capture_log():
    """Inside this block, every piece of text llama.cpp logs (all levels, as written: a line may come in several
    pieces) is appended to the list it yields."""
    global _captured
    lib()
    outer, _captured = _captured, []
    try:
        yield _captured
    finally:
        if outer is not None:
            outer.extend(_captured)
        _captured = outer


def last_error() -> str:
    lines = [ln for ln in _log_lines if ln]
    return lines[-1] if lines else "no message from llama.cpp"


def supports_gpu_offload() -> bool:
    return bool(lib().llama_supports_gpu_offload())


def system_info() -> str:
    """llama.cpp's feature string (the CPU features its build uses, AMX, repacking, GPU backends)."""
    return lib().llama_print_system_info().decode("utf-8", "replace").strip()


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (Linux); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- safe loading --------------------------------------------------------------------------------------------

@dataclass
class LoadPath:
    """How a model is loaded here: with llama.cpp's extra buffer types (its fast default) or without."""

    extra_bufts: bool
    probe: str  # what decided it, in words

    def describe(self) -> dict:
        return {"extra_bufts": self.extra_bufts, "probe": self.probe}


def _build_id() -> str:
    """llama-cpp-python's version and its shared libraries (name, size, mtime): a rebuild changes it."""
    import llama_cpp
    from llama_cpp import llama_cpp as L

    h = hashlib.sha256(llama_cpp.__version__.encode())
    folder = Path(getattr(L, "_base_path", Path(llama_cpp.__file__).parent / "lib"))
    for f in sorted(folder.glob("*")) if folder.is_dir() else []:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _machine_id() -> str:
    """The CPU, its flags and the kernel (which grants or withholds the AMX tile state)."""
    flags = " ".join(sorted(cpu_flags()))
    return hashlib.sha256(f"{cpu_name()}|{flags}|{platform.release()}".encode()).hexdigest()[:16]


def _tensor_types(path: Path) -> str:
    """The GGML types of a GGUF's tensors, e.g. 'F32,Q4_1': the extra buffer types only take some of them."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # not a GGUF llama.cpp could load either; let the real load say why
        return f"unreadable:{type(e).__name__}"
    return ",".join(sorted({t.tensor_type.name for t in reader.tensors}))


def _probe_wanted() -> bool:
    mode = os.environ.get(PROBE_ENV, "auto").lower()
    if mode not in ("auto", "always", "never"):
        raise UserError(f"{PROBE_ENV} must be auto, always or never, got '{mode}'")
    if mode != "auto":
        return mode == "always"
    return any(f.startswith("amx") for f in cpu_flags())


def _probe_argv(base: Path, extra_bufts: bool) -> list[str]:
    """The child that loads `base` and decodes a few tokens (see _probe_child)."""
    return [sys.executable, "-c", "import sys; from memcli.llama.library import _probe_child; "
            "_probe_child(sys.argv[1], sys.argv[2] == '1')", str(base), "1" if extra_bufts else "0"]


def _run_probe(base: Path, extra_bufts: bool) -> int | None:
    """The child's exit status: 0 works, a negative number is the signal that killed it, None a time-out."""
    try:
        done = subprocess.run(_probe_argv(base, extra_bufts), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None
    return done.returncode


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _probe_child(base: str, extra_bufts: bool) -> None:
    """In the child: load with the default settings (CPU only), decode 8 tokens in one batch, exit 0."""
    L = lib()
    params = L.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = extra_bufts
    model = L.llama_model_load_from_file(base.encode(), params)
    if not model:
        sys.exit(3)
    n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)))
    cparams = L.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.no_perf = 64, 32, 32, True
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        sys.exit(4)
    tokens = (L.llama_token * 8)(*[(17 * i + 1) % n_vocab for i in range(8)])
    rc = L.llama_decode(ctx, L.llama_batch_get_one(tokens, 8))
    L.llama_free(ctx)
    L.llama_model_free(model)
    sys.exit(0 if rc == 0 else 5)


def _cache_file() -> Path:
    return cache_dir() / "llama-probe.json"


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, verdict: dict) -> None:
    data = _read_cache()
    data[key] = verdict
    try:
        write_json(_cache_file(), data, what="probe cache")
    except UserError:
        pass  # an unwritable cache only means probing again next time


def load_path(base: str | os.PathLike, log=None) -> LoadPath:
    """Whether llama.cpp may use its extra buffer types for this model on this machine (probing once)."""
    base = Path(base)
    if not _probe_wanted():
        return LoadPath(True, "not needed (this CPU reports no AMX)")
    key = f"{_build_id()}|{_machine_id()}|{_tensor_types(base)}"
    cached = _read_cache().get(key)
    if cached is None:
        cached = _decide(base)
        if cached is None:  # the test load failed without a crash: the real load will say why
            return LoadPath(True, "the test load failed without a crash; loading with the defaults")
        _write_cache(key, cached)
    path = LoadPath(bool(cached["extra_bufts"]), cached["probe"])
    if cached.get("error"):
        raise UserError(cached["error"])
    if not path.extra_bufts and log is not None and key not in _said:
        _said.add(key)
        log(f"note: llama.cpp's extra buffer types (AMX/repacked weights) crash on this machine ({path.probe}); "
            "loading without them (slower, same results)")
    return path


def _decide(base: Path) -> dict | None:
    """The verdict of the probe children; None when the default load fails without a crash."""
    rc = _run_probe(base, True)
    if rc == 0:
        return {"extra_bufts": True, "probe": "the default load passed a test decode"}
    if rc is not None and rc > 0:
        return None
    why = "timed out" if rc is None else f"died by {_signal_name(rc)}"
    rc_plain = _run_probe(base, False)
    if rc_plain is not None and rc_plain < 0:
        return {"extra_bufts": False, "probe": f"the default load {why} in a test decode",
                "error": f"llama.cpp dies by {_signal_name(rc_plain)} on this machine even without its extra "
                         "buffer types: the installed llama-cpp-python was probably built for another CPU; "
                         f"rebuild it here: CMAKE_ARGS=-DGGML_NATIVE=off {INSTALL_HINT} --no-cache-dir"}
    return {"extra_bufts": False, "probe": f"the default load {why} in a test decode"}


def model_params(base: str | os.PathLike, n_gpu_layers: int, log=None):
    """(llama_model_params for loading `base` safely here, the LoadPath taken)."""
    L = lib()
    path = load_path(base, log)
    params = L.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.use_extra_bufts = path.extra_bufts
    return params, path


@contextlib.contextmanager
def safe_defaults(base: str | os.PathLike, log=None):
    """For code that builds llama-cpp-python's high-level `Llama`: inside this block, the model parameters it
    starts from load `base` safely on this machine."""
    L = lib()
    path = load_path(base, log)
    if path.extra_bufts:
        yield path
        return
    original = L.llama_model_default_params

    def defaults():
        params = original()
        params.use_extra_bufts = False
        return params

    L.llama_model_default_params = defaults
    try:
        yield path
    finally:
        L.llama_model_default_params = original
