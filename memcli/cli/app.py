"""The `memcli` command line: parse, call, print; the work lives in the modules it calls. The small commands are
here; train, export, law and verify (and bench) have their own modules, registered below in `--help`'s order."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from memcli.cli import export, law, train, verify
from memcli.cli.bench import bench_app
from memcli.cli.terminal import console, out_console, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Memorise a corpus into a LoRA adapter (MemFT), verify verbatim recall, plan adapter capacity.")
data_app = typer.Typer(no_args_is_help=True, help="Generate benchmark corpora.")
app.add_typer(data_app, name="data")


# --- models, data ------------------------------------------------------------------------------------------

@app.command("models")
@user_errors
def models_cmd():
    """List the named models and where their weights come from."""
    from rich.table import Table

    from memcli.core import models

    table = Table("name", "weights", "description")
    for name, status, description in models.describe():
        table.add_row(name + (" (default)" if name == models.DEFAULT_MODEL else ""), status, description)
    out_console.print(table)
    out_console.print(f"Also accepted: a local Hugging Face model folder ({export.FAMILIES}) or a .gguf file.")


@app.command()
@user_errors
def doctor(probe: bool = typer.Option(False, "--probe", help="On a CPU with AMX, test-load the default model "
                                      "in a child process to see whether llama.cpp's AMX path works here."),
           as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")):
    """What this installation and machine are: versions, llama.cpp's build and features, CPU features (AVX2,
    AVX-512, AMX), GPU offload, torch's device, the model cache. Paste it into bug reports."""
    import json

    from rich.table import Table

    from memcli.cli.doctor import collect, lines

    report = collect(probe)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table("", "", show_header=False, box=None)
    for label, value in lines(report):
        table.add_row(label, value)
    out_console.print(table, highlight=False)


@data_app.command("phonebook")
@user_errors
def data_phonebook(entries: int = typer.Option(100, help="Number of entries."),
                   seed: int = typer.Option(0, help="Random seed."),
                   out: Path = typer.Option(..., help="Output JSONL file.")):
    """A PhoneBook corpus: unique "First Last:" keys, unique 10-digit numbers starting with 6-9."""
    from memcli.core.datagen import generate_phonebook, write_jsonl

    write_jsonl(out, generate_phonebook(entries, seed))
    console.print(f"wrote {entries} entries to {out}")


@data_app.command("random")
@user_errors
def data_random(tokens: int = typer.Option(..., help="Length of the value in tokens."),
                seed: int = typer.Option(0, help="Random seed."),
                model: str = typer.Option(None, help="Model whose vocabulary to draw from (default smollm2-135m)."),
                out: Path = typer.Option(..., help="Output JSONL file.")):
    """One value of N random vocabulary tokens, as text that re-tokenises to the same ids."""
    from memcli.core import models
    from memcli.core.datagen import generate_random_tokens, write_jsonl

    tokenizer = models.load_tokenizer(models.resolve(model))
    write_jsonl(out, [generate_random_tokens(tokens, seed, tokenizer)])
    console.print(f"wrote one value of {tokens} random tokens to {out}")


@data_app.command("from-table")
@user_errors
def data_from_table(table: Path = typer.Argument(..., help="A .csv or .tsv file with a header row, or a .jsonl file "
                                                 "of objects: one fact per row."),
                    query_template: str = typer.Option(..., help="The query of a row, its columns as {name}: "
                                                       "e.g. \"ZIP {zip}:\"."),
                    target_template: str = typer.Option(..., help="The value to memorise, e.g. \" {city}, "
                                                        "{state}\" (a leading space, as a value follows its key)."),
                    out: Path = typer.Option(..., help="Output JSONL corpus (query/target).")):
    """A corpus from a table: one query and target per row, rendered from the templates (a missing column, an
    empty field or a query given two targets is refused, naming the line)."""
    from memcli.core.datagen import write_jsonl
    from memcli.core.table import table_corpus

    rows, repeats = table_corpus(table, query_template, target_template)
    write_jsonl(out, rows)
    console.print(f"wrote {len(rows)} entries to {out}" + (f" ({repeats} repeated rows written once)" if repeats
                                                           else ""))


@user_errors
def ask(target: Path = typer.Argument(..., help="A run folder, a model .gguf (e.g. a merged file) or an adapter "
                                      ".gguf."),
        prompt: str = typer.Argument(..., help="The prompt, e.g. a key: \"Ada Okafor:\"."),
        model: Optional[str] = typer.Option(None, help="The base for a run or an adapter .gguf (a .gguf, e.g. a "
                                            "quantised base, or a model name). \\[default: the run's model as "
                                            "deployed: the shipped GGUF of a model shipped quantised]"),
        max_tokens: int = typer.Option(48, help="Most tokens to generate."),
        chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Wrap the "
                                                     "prompt in the chat template. \\[default: the run's setting]"),
        stop_newline: bool = typer.Option(True, "--stop-newline/--no-stop-newline", help="Stop at a newline."),
        n_gpu_layers: Optional[int] = typer.Option(None, help="Layers to offload. \\[default: all with GPU "
                                                   "support]")):
    """The greedy completion of PROMPT in llama.cpp (llama-cpp-python's own generation, not memcli's scorer)."""
    from memcli.commands.ask import ask as run_ask

    result = run_ask(target, prompt, model=model, max_tokens=max_tokens, chat_template=chat_template,
                     stop_newline=stop_newline, n_gpu_layers=n_gpu_layers)
    print(prompt + result["completion"])
    console.print(f"({result['tokens']} tokens, stopped at {result['stopped']}; {result['model']}"
                  f"{' + ' + result['adapter'] if result['adapter'] else ''})", highlight=False)


@user_errors
def serve_check_cmd(corpus: Path = typer.Argument(..., help="The corpus whose keys are asked."),
                    url: str = typer.Option(..., help="The server's base URL, e.g. http://127.0.0.1:8000 (an "
                                            "OpenAI-compatible API: llama-cpp-python's server, llama-server, "
                                            "ollama, LM Studio)."),
                    chat: bool = typer.Option(False, "--chat", help="Ask through /v1/chat/completions (the key as "
                                              "the user's message, no system message) instead of /v1/completions."),
                    model: Optional[str] = typer.Option(None, help="The model name the server expects, if any."),
                    key: str = typer.Option("", help="The key of a .txt corpus."),
                    max_tokens: int = typer.Option(64, help="Most tokens per answer."),
                    report: Optional[Path] = typer.Option(None, help="A `memcli verify` report folder of the same "
                                                          "corpus: compare the served answers with its verdicts."),
                    out: Optional[Path] = typer.Option(None, "--out", help="Write every answer to this JSONL file.")):
    """Ask a running server every key at temperature 0 and its other defaults, as a user's client does: how many
    values it serves verbatim, and (with --report) whether they are the entries memcli certified (exit 0: every
    value served; 1: not)."""
    from memcli.cli.terminal import print_serve_check, verify_progress
    from memcli.commands.serve_check import serve_check

    update, close = verify_progress()
    try:
        result = serve_check(corpus, url, chat=chat, model=model, key=key, max_tokens=max_tokens, report=report,
                             out=out, progress=update)
    finally:
        close()
    print_serve_check(result)
    raise typer.Exit(0 if result["served"] == result["entries"] else 1)



# --- the commands of cli/train.py, export.py, law.py and verify.py, in the order `memcli --help` lists them -----

app.command()(train.train)
app.command()(export.export)
app.command("export-base")(export.export_base_cmd)
app.command()(ask)
app.command("serve-check")(serve_check_cmd)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(train.sweep)
app.command()(law.fit)
app.command()(law.plan)
app.command("verify")(verify.verify_cmd)

# --- benchmarks: memcli bench (cli_bench.py) -------------------------------------------------------------

app.add_typer(bench_app, name="bench")



def main() -> None:
    """The console script. `--locality` takes an optional TEXT, which typer cannot express: given last, or
    followed by another option, it is rewritten to `--locality=` (the default reference) before parsing."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--locality" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            args[i] = "--locality="
    app(args=args, prog_name="memcli")
