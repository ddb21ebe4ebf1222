"""`memcli data from-table`: facts in a table made into a corpus, against corpora written out by hand, and every
bad table refused in one line naming the line."""

import json

import pytest
from helpers import assert_refused, run_cli

ZIPS_CSV = 'zip,city,state\n15928,Davidsville,PA\n"02134","Boston, Allston",MA\n15928,Davidsville,PA\n'


def corpus(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name,text", [
    ("zips.csv", ZIPS_CSV),
    ("zips.tsv", "zip\tcity\tstate\n15928\tDavidsville\tPA\n02134\tBoston, Allston\tMA\n"),
    ("zips.jsonl", '{"zip": "15928", "city": "Davidsville", "state": "PA"}\n\n'
                   '{"zip": "02134", "city": "Boston, Allston", "state": "MA"}\n'),
])
def test_a_table_becomes_the_corpus_written_by_hand(tmp_path, name, text):
    table, out = tmp_path / name, tmp_path / "zips.jsonl.out"
    table.write_text(text, encoding="utf-8")
    result = run_cli("data", "from-table", table, "--query-template", "ZIP {zip}:", "--target-template",
                     " {city}, {state}", "--out", out)
    assert result.exit_code == 0, result.output
    assert corpus(out) == [{"query": "ZIP 15928:", "target": " Davidsville, PA"},
                           {"query": "ZIP 02134:", "target": " Boston, Allston, MA"}]
    if name.endswith(".csv"):
        assert "1 repeated rows written once" in " ".join(result.stderr.split())
    assert run_cli("train", out, "--out", tmp_path / "r", "--model", "tiny", "--max-steps", "1").exit_code == 0


@pytest.mark.parametrize("text,args,message", [
    (ZIPS_CSV, ["ZIP {zip}:", "{county}"], "zips.csv:2: --target-template names the column 'county'"),
    ("zip,city\n15928,\n", ["ZIP {zip}:", " {city}"], "zips.csv:2: the column 'city' is empty"),
    ("zip,city\n15928,A\n15928,B\n", ["ZIP {zip}:", " {city}"],
     "zips.csv:3: the query 'ZIP 15928:' was given ' A' on line 2 and ' B' here"),
    ("zip,city\n15928,A\n", ["ZIP:", " {city}"], "--query-template names no column"),
    ("zip,city\n15928,A\n", ["{zip", " {city}"], "--query-template '{zip' is not a valid template"),
    ("zip,city\n15928,A\n", ["{0}:", " {city}"], "'{0}' does not name a column"),
    ("zip,city\n15928,A,extra\n", ["ZIP {zip}:", " {city}"], "zips.csv:2: more fields than the header has columns"),
    ("zip,city\n", ["ZIP {zip}:", " {city}"], "has no rows"),
    ("", ["ZIP {zip}:", " {city}"], "no header row"),
])
def test_bad_tables_exit_2_in_one_line_and_write_nothing(tmp_path, text, args, message):
    table, out = tmp_path / "zips.csv", tmp_path / "out.jsonl"
    table.write_text(text, encoding="utf-8")
    query, target = args
    assert_refused(run_cli("data", "from-table", table, "--query-template", query, "--target-template", target,
                           "--out", out), message)
    assert not out.exists()


def test_other_files_are_refused(tmp_path):
    xlsx = tmp_path / "zips.xlsx"
    xlsx.write_bytes(b"PK\x03\x04")
    assert_refused(run_cli("data", "from-table", xlsx, "--query-template", "{a}", "--target-template", "{b}",
                           "--out", tmp_path / "o.jsonl"), "a table is a .csv, .tsv, .jsonl file")
    assert_refused(run_cli("data", "from-table", tmp_path / "missing.csv", "--query-template", "{a}",
                           "--target-template", "{b}", "--out", tmp_path / "o.jsonl"), "does not exist")


def test_a_jsonl_table_line_that_is_not_an_object_is_refused(tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text('{"zip": "1", "city": "A"}\n[1, 2]\n', encoding="utf-8")
    assert_refused(run_cli("data", "from-table", table, "--query-template", "{zip}:", "--target-template", " {city}",
                           "--out", tmp_path / "o.jsonl"), "t.jsonl:2: expected a JSON object, got list")
