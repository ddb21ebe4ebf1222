"""Safe loading of llama.cpp models (the AMX probe) and `memcli doctor`.

No AMX hardware is needed: the probe child that would die on such a host is replaced by one that kills itself
with SIGILL, which is exactly what the parent sees there."""

import json
import signal
import sys

import pytest
from helpers import run_cli


def _dies_by(sig):
    return [sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), signal.{sig.name})"]


@pytest.fixture
def probe_env(tmp_path, monkeypatch):
    """A fresh probe cache, the probe forced on (as on an AMX host), and a record of the children started."""
    from memcli.llama import library

    monkeypatch.setenv("MEMCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(library.PROBE_ENV, "always")
    monkeypatch.setattr(library, "_said", set())
    calls = []
    real = library._probe_argv

    def install(crash_default=None, crash_plain=None):
        def argv(base, extra_bufts):
            calls.append(extra_bufts)
            sig = crash_default if extra_bufts else crash_plain
            return _dies_by(sig) if sig else real(base, extra_bufts)
        monkeypatch.setattr(library, "_probe_argv", argv)
    return install, calls


@pytest.fixture(scope="module")
def tiny_gguf():
    from memcli.core import models
    from memcli.gguf.base import base_gguf

    return base_gguf(models.resolve("tiny"))


@pytest.mark.slow  # a probe child
def test_probe_passes_on_a_working_build_and_keeps_the_fast_path(probe_env, tiny_gguf):
    from memcli.llama import library

    install, calls = probe_env
    install()  # the real child: llama.cpp really loads the model and decodes
    path = library.load_path(tiny_gguf)
    assert path.extra_bufts is True and "passed" in path.probe
    assert calls == [True]


@pytest.mark.slow  # probe children
def test_a_child_killed_by_sigill_switches_to_plain_buffers_once_and_is_cached(probe_env, tiny_gguf):
    from memcli.llama import library

    install, calls = probe_env
    install(crash_default=signal.SIGILL)
    notes = []
    path = library.load_path(tiny_gguf, log=notes.append)
    assert path.extra_bufts is False and "SIGILL" in path.probe
    assert calls == [True, False]  # the default load died; the plain load was probed and works
    assert len(notes) == 1 and "SIGILL" in notes[0]
    again = library.load_path(tiny_gguf, log=notes.append)
    assert again.extra_bufts is False
    assert calls == [True, False], "the verdict must come from the cache"
    assert len(notes) == 1, "the note is said once"
    cache = json.loads((library._cache_file()).read_text())
    assert [v["extra_bufts"] for v in cache.values()] == [False]


@pytest.mark.slow  # probe children
def test_the_fallback_really_loads_and_scores_with_extra_bufts_off(probe_env, tiny_gguf):
    """The backend asks llama.cpp for use_extra_bufts = False and still scores (the same numbers: the F32 model
    never takes the repacked path)."""
    from memcli.core.corpus import Example
    from memcli.llama import library
    from memcli.llama.scorer import LlamaBackend

    install, _ = probe_env
    examples = [Example(prompt_ids=(1, 5, 9), target_ids=(20, 30, 40), line=1)]

    def probs():
        with LlamaBackend(tiny_gguf, threads=1) as backend:
            backend.open(examples, 64)
            stats = next(iter(backend.score(examples, 64))).stats
            return backend.describe(), stats.logprob.copy()

    install()
    fast, lp_fast = probs()
    library._cache_file().unlink()
    install(crash_default=signal.SIGILL)
    safe, lp_safe = probs()
    assert fast["extra_bufts"] is True and safe["extra_bufts"] is False
    assert "SIGILL" in safe["probe"]
    assert lp_safe == pytest.approx(lp_fast, abs=1e-5)


@pytest.mark.slow  # probe children
def test_a_build_that_dies_even_without_extra_bufts_is_a_clear_error(probe_env, tiny_gguf):
    from memcli.core.errors import UserError
    from memcli.llama import library

    install, _ = probe_env
    install(crash_default=signal.SIGILL, crash_plain=signal.SIGSEGV)
    with pytest.raises(UserError, match="SIGSEGV.*even without"):
        library.load_path(tiny_gguf)


@pytest.mark.slow  # a probe child and a verify pass
def test_verify_records_the_load_path_in_its_report(probe_env, tiny_gguf, pb8, tmp_path):
    install, _ = probe_env
    install(crash_default=signal.SIGILL)
    out = tmp_path / "v"
    result = run_cli("verify", pb8, "--model", "tiny", "--out", out, "--min-exact", "0")
    assert result.exit_code == 0, result.output
    backend = json.loads((out / "report.json").read_text())["backend"]
    assert backend["extra_bufts"] is False and "SIGILL" in backend["probe"]
    assert "extra buffer types" in result.stderr


@pytest.mark.slow  # loads a model in llama.cpp
def test_no_probe_where_the_cpu_has_no_amx(monkeypatch, tmp_path, tiny_gguf):
    from memcli.llama import library

    monkeypatch.setenv("MEMCLI_CACHE", str(tmp_path))
    monkeypatch.delenv(library.PROBE_ENV, raising=False)
    monkeypatch.setattr(library, "cpu_flags", lambda: {"avx2", "fma"})
    calls = []
    monkeypatch.setattr(library, "_probe_argv", lambda base, extra: calls.append(extra) or [sys.executable, "-c", ""])
    assert library.load_path(tiny_gguf).extra_bufts is True
    assert calls == []
    monkeypatch.setattr(library, "cpu_flags", lambda: {"avx2", "amx_tile", "amx_int8"})
    assert library.load_path(tiny_gguf).extra_bufts is True
    assert calls == [True]


def test_an_old_llama_cpp_python_is_named_with_the_install_command(monkeypatch):
    from llama_cpp import llama_cpp as L

    from memcli.core.errors import UserError
    from memcli.llama import library

    monkeypatch.delattr(L, "llama_set_adapters_lora")
    with pytest.raises(UserError, match=f"llama_set_adapters_lora.*llama-cpp-python=={library.LLAMA_CPP_VERSION}"):
        library._check_api(L)


def test_doctor_reports_versions_features_and_cache(tmp_path, monkeypatch):
    import llama_cpp
    import torch

    monkeypatch.setenv("MEMCLI_CACHE", str(tmp_path))
    (tmp_path / "blob").write_bytes(b"x" * 3000)
    result = run_cli("doctor", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["llama_cpp"]["llama_cpp_python"] == llama_cpp.__version__
    assert report["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    flags = open("/proc/cpuinfo").read()
    assert report["cpu"]["avx2"] == (" avx2 " in flags or " avx2\n" in flags)
    assert report["cache"]["bytes"] == 3000
    assert "CPU" in report["llama_cpp"]["system_info"]
    text = run_cli("doctor")
    assert text.exit_code == 0 and "llama.cpp features" in text.stdout and "AMX" in text.stdout
