"""Facts as people hold them, in a table, made into a corpus (`memcli data from-table`): each row renders a query
and a target from templates naming its columns, e.g. "ZIP {zip}:" and " {city}, {state}".

A .csv or .tsv file has a header row (the column names; Python's csv dialect, quoted fields allowed); a .jsonl
file has one object per line, its keys the columns. Refused, naming the line: a template naming a column the
table lacks, a row whose field a template needs is empty, and a query given two different targets. A row that
repeats an earlier row's query and target is one fact, written once.
"""

from __future__ import annotations

import csv
import os
import string
from pathlib import Path
from typing import Iterator

from memcli.core.corpus import json_object
from memcli.core.errors import UserError

FORMATS = (".csv", ".tsv", ".jsonl")


def template_fields(template: str, option: str) -> list[str]:
    """The column names a template uses ({name}); a malformed template is a UserError naming the option."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise UserError(f"{option} '{template}' is not a valid template ({e}); write a column as {{name}} and a "
                        "brace as {{ or }}") from None
    for name in names:  # a column by name: not empty, not positional ({0}), no attribute or index ({a.b}, {a[0]})
        if not name or name.isdigit() or any(c in name for c in ".["):
            raise UserError(f"{option} '{template}': '{{{name}}}' does not name a column")
    return names


def iter_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for every data row of a table file."""
    if path.suffix not in FORMATS:
        raise UserError(f"{path}: a table is a {', '.join(FORMATS)} file")
    if not path.is_file():
        raise UserError(f"table {path} does not exist")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.suffix == ".jsonl":
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield n, json_object(path, n, line)
            else:
                reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
                if not reader.fieldnames:
                    raise UserError(f"{path}: no header row (the column names)")
                for row in reader:
                    if None in row:
                        raise UserError(f"{path}:{reader.line_num}: more fields than the header has columns")
                    yield reader.line_num, row
    except UnicodeDecodeError as e:
        raise UserError(f"table {path} is not UTF-8 text ({e.reason})") from None


def _render(template: str, fields: list[str], row: dict, path: Path, n: int, option: str) -> str:
    values = {}
    for name in fields:
        if name not in row:
            raise UserError(f"{path}:{n}: {option} names the column '{name}', which the table does not have "
                            f"(columns: {', '.join(map(str, row))})")
        value = row[name]
        if value is None or str(value).strip() == "":
            raise UserError(f"{path}:{n}: the column '{name}' is empty")
        values[name] = str(value)
    return template.format(**values)


def table_corpus(path: str | os.PathLike, query_template: str, target_template: str) -> tuple[list[dict], int]:
    """({"query", "target"} rows in table order, repeated rows dropped) and how many repeats were dropped."""
    path = Path(path)
    q_fields = template_fields(query_template, "--query-template")
    t_fields = template_fields(target_template, "--target-template")
    if not q_fields:
        raise UserError("--query-template names no column: every query would be the same")
    rows, seen, repeats = [], {}, 0
    for n, row in iter_rows(path):
        query = _render(query_template, q_fields, row, path, n, "--query-template")
        target = _render(target_template, t_fields, row, path, n, "--target-template")
        if query in seen:
            first_line, first_target = seen[query]
            if first_target != target:
                raise UserError(f"{path}:{n}: the query {query!r} was given {first_target!r} on line {first_line} "
                                f"and {target!r} here: one of them could never be recalled")
            repeats += 1
            continue
        seen[query] = (n, target)
        rows.append({"query": query, "target": target})
    if not rows:
        raise UserError(f"table {path} has no rows")
    return rows, repeats
