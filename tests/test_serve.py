"""Certified where it is served: a real llama-cpp-python OpenAI-compatible server (`python -m llama_cpp.server`, the
`server` extra) on a merged file memcli made, asked every key by a plain HTTP client with the server's default
request (temperature 0, nothing else set: its repeat penalty 1.1 applies), answers exactly the entries that
`memcli verify --sampler llama-cpp-python` says it will, and `memcli serve-check` reports the same."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from helpers import assert_refused, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("served") / "merged.f16.gguf"
    result = run_cli("export", tiny_run, "--merge", "--quant", "f16", "--out", path)
    assert result.exit_code == 0, result.output
    return path


def start_server(merged):
    """llama-cpp-python's server on 127.0.0.1 and a free port, stopped at the end."""
    pytest.importorskip("llama_cpp.server.app", reason="the server extra: pip install 'llama-cpp-python[server]'")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(merged), "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", "1", "--n_ctx", "512"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(merged):
    yield from start_server(merged)


def completion(url: str, prompt: str) -> str:
    """The server's default request, as the `openai` client sends it with temperature 0 and nothing else."""
    body = json.dumps({"prompt": prompt, "max_tokens": 32, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["text"]


@pytest.mark.slow  # an export, a server start and a verify
def test_the_server_answers_what_memcli_certified_for_its_sampler(server, merged, pb8, tmp_path):
    rows = [json.loads(line) for line in pb8.read_text().splitlines()]
    served = {i: completion(server, r["query"]).startswith(r["target"]) for i, r in enumerate(rows, 1)}

    def verdicts(sampler):
        out = tmp_path / sampler
        result = run_cli("verify", pb8, "--model", merged, "--out", out, "--sampler", sampler, "--min-exact", "0",
                         "--threads", "1")
        assert result.exit_code == 0, result.output
        return {r["line"]: r["exact"] for r in map(json.loads, (out / "entries.jsonl").read_text().splitlines())}

    assert verdicts("llama-cpp-python") == served
    assert 0 < sum(served.values()) < len(rows)  # some recalled, some not: the comparison can tell

    check = run_cli("serve-check", pb8, "--url", server, "--report", tmp_path / "llama-cpp-python",
                    "--out", tmp_path / "served.jsonl")
    assert check.exit_code == 1  # not every value is served
    answers = [json.loads(line) for line in (tmp_path / "served.jsonl").read_text().splitlines()]
    assert {a["line"]: a["served"] for a in answers} == served
    assert all(a["memcli_exact"] == a["served"] for a in answers)
    said = " ".join(check.stdout.split())
    assert f"served {sum(served.values())}/{len(rows)} values verbatim" in said
    assert "certified but not served: lines none; served but not certified: lines none" in said


@pytest.mark.slow  # training to certified recall, an export, a server start
def test_a_chat_run_is_served_through_chat_completions(pb8, tmp_path):
    """train --chat-template --sampler llama-cpp-python, merged: the server's chat completions (the key as the
    user's message, no system message, its default request) answer every value, as verify says."""
    run, merged = tmp_path / "run", tmp_path / "chat.f16.gguf"
    trained = run_cli("train", pb8, "--out", run, "--model", "tiny", "--until-recall", "--chat-template",
                      "--sampler", "llama-cpp-python", "--max-steps", "600")
    assert trained.exit_code == 0, trained.output
    assert run_cli("export", run, "--merge", "--quant", "f16", "--out", merged).exit_code == 0
    v = run_cli("verify", pb8, "--lora", run, "--out", tmp_path / "v", "--threads", "1")
    assert v.exit_code == 0, v.output  # certified: the run's chat template, end of turn and sampler
    rows = [json.loads(line) for line in pb8.read_text().splitlines()]
    for url in start_server(merged):
        answers = []
        for r in rows:
            body = json.dumps({"messages": [{"role": "user", "content": r["query"]}], "temperature": 0}).encode()
            request = urllib.request.Request(url + "/v1/chat/completions", body,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                answers.append(json.loads(response.read())["choices"][0]["message"]["content"])
        assert [a.strip() for a in answers] == [r["target"].strip() for r in rows]  # the value, and it stops
        check = run_cli("serve-check", pb8, "--url", url, "--chat")
        assert check.exit_code == 0 and "served 8/8" in " ".join(check.stdout.split())


def test_serve_check_refuses_an_unreachable_server_in_one_line(pb8, tmp_path):
    assert_refused(run_cli("serve-check", pb8, "--url", f"http://127.0.0.1:{free_port()}"), "cannot reach")
    assert_refused(run_cli("serve-check", pb8, "--url", "http://127.0.0.1:1", "--max-tokens", "0"),
                   "--max-tokens must be at least 1")
    for url in ("notaurl", "127.0.0.1:8080", "ftp://127.0.0.1"):
        assert_refused(run_cli("serve-check", pb8, "--url", url), "--url must be a server's address")
