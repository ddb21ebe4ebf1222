"""`memcli serve-check`: ask a running server every key of a corpus, as a user's client does, and compare its
answers with the values (and, given a verify report, with what memcli certified for that server's sampler).

The server is any OpenAI-compatible endpoint (llama-cpp-python's `python -m llama_cpp.server`, llama.cpp's
llama-server, ollama's /v1, LM Studio): a completion request with the key as the prompt, or a chat request with
the key as the user's message (no system message), at temperature 0 and otherwise the server's own defaults.
An entry is served when the answer begins with the value (for a chat answer, leading white space aside).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from memcli.core.corpus import iter_entries
from memcli.core.errors import UserError
from memcli.core.runs import atomic_write


def query_server(url: str, key: str, *, chat: bool, model: str | None, max_tokens: int, timeout: float) -> str:
    """The server's answer to one key (its completion or its chat message)."""
    body: dict = {"max_tokens": max_tokens, "temperature": 0}
    if model:
        body["model"] = model
    if chat:
        body["messages"] = [{"role": "user", "content": key}]
    else:
        body["prompt"] = key
    endpoint = url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    request = urllib.request.Request(endpoint, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise UserError(f"{endpoint} answered HTTP {e.code}: {e.read()[:200].decode('utf-8', 'replace')}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise UserError(f"cannot reach {endpoint} ({getattr(e, 'reason', e)})") from None
    try:
        choice = answer["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
    except (KeyError, IndexError, TypeError):
        raise UserError(f"{endpoint} did not answer as an OpenAI-compatible API does (no choices[0]."
                        f"{'message.content' if chat else 'text'})") from None
    return text or ""


def served(answer: str, value: str, chat: bool) -> bool:
    return answer.lstrip().startswith(value.lstrip()) if chat else answer.startswith(value)


def certified_by_line(report: str | os.PathLike) -> dict[int, dict]:
    """entries.jsonl of a verify report folder, by corpus line."""
    path = Path(report) / "entries.jsonl"
    if not path.exists():
        raise UserError(f"{report} is not a verify report folder (no entries.jsonl)")
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    return {row["line"]: row for row in rows}


def serve_check(corpus: str | os.PathLike, url: str, *, chat: bool = False, model: str | None = None,
                key: str = "", max_tokens: int = 64, report: str | os.PathLike | None = None,
                out: str | os.PathLike | None = None, timeout: float = 120.0, progress=None) -> dict:
    """Every entry asked; {"entries", "served", "rows"[, "agreement"]}: with `report`, how the served answers
    match what memcli certified (exact) entry by entry."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--url must be a server's address such as http://127.0.0.1:8080, got {url!r}")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    certified = certified_by_line(report) if report is not None else None
    entries = list(iter_entries(corpus, key))
    rows = []
    for i, e in enumerate(entries):
        answer = query_server(url, e.key, chat=chat, model=model, max_tokens=max_tokens, timeout=timeout)
        row = {"line": e.line, "key": e.key, "served": served(answer, e.value, chat), "answer": answer}
        if certified is not None:
            row["memcli_exact"] = certified[e.line]["exact"] if e.line in certified else None
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(entries))
    result = {"url": url, "chat": chat, "entries": len(rows), "served": sum(r["served"] for r in rows), "rows": rows}
    if certified is not None:
        pairs = [(r["memcli_exact"], r["served"]) for r in rows if r["memcli_exact"] is not None]
        result["agreement"] = {
            "both": sum(a and b for a, b in pairs), "neither": sum(not a and not b for a, b in pairs),
            "certified_not_served": [r["line"] for r in rows if r["memcli_exact"] and not r["served"]],
            "served_not_certified": [r["line"] for r in rows if r["memcli_exact"] is False and r["served"]],
            "not_in_report": [r["line"] for r in rows if r["memcli_exact"] is None]}
    if out is not None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), example="served.jsonl")
    return result
