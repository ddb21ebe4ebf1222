"""Rewrite docs/commands.md's option reference (from "## Option reference" to the end) from the CLI itself:
every option of every command, its default and help, as `memcli COMMAND --help` shows them.

    python docs/option_reference.py      # after adding or changing an option; tests/test_docs.py checks it
"""

import re
from pathlib import Path

import typer

from memcli.cli.app import app


def walk(group, prefix):
    for name, sub in sorted(group.commands.items()):
        if hasattr(sub, 'commands'):
            yield from walk(sub, [*prefix, name])
        else:
            yield " ".join([*prefix, name]), sub

def cell(s):
    return s.replace("\\[", "[").replace("|", "\\|").replace("\n", " ")

out = ["## Option reference", "",
       "Every option of every command with its default, as `memcli COMMAND --help` prints them (`tests/test_docs.py`",
       "checks that none is missing here; `python docs/option_reference.py` rewrites this section). `train`'s defaults "
       "are `TrainConfig`'s ([examples/train.yaml](../examples/train.yaml)).", ""]
root = typer.main.get_command(app)
for name, cmd in walk(root, []):
    out += [f"### `memcli {name}`", ""]
    first = (cmd.help or "").strip().split("\n\n")[0].replace("\n", " ")
    if first:
        out += [cell(first), ""]
    out += ["| option | default | meaning |", "|---|---|---|"]
    for p in cmd.params:
        if p.param_type_name == 'argument':
            names = f"`{(p.metavar or p.name).upper()}`" + (" ..." if p.nargs == -1 else "")
            default = "(required)" if p.required else "-"
        else:
            opts = [o for o in p.opts if o.startswith("--")]
            names = " / ".join(f"`{o}`" for o in opts + list(p.secondary_opts))
            default = "(required)" if p.required else ""
        help_ = getattr(p, "help", None) or ""
        m = re.search(r"\s*\\?\[default: ([^\]]*)\]", help_)
        if m:
            default, help_ = m.group(1), help_[:m.start()] + help_[m.end():]
        elif not default and p.param_type_name == 'option':
            d = p.default
            if p.is_flag and not p.secondary_opts:
                default = "off"
            elif p.is_flag:
                default = "-" if d is None else ("on" if d else "off")
            elif d is None or d == ():
                default = "-"
            elif isinstance(d, (list, tuple)):
                default = ", ".join(f"`{x}`" for x in d)
            elif d == "":
                default = "empty"
            else:
                default = f"`{d}`"
        out.append(f"| {names} | {cell(str(default))} | {cell(help_.strip())} |")
    out.append("")
doc = Path(__file__).resolve().parent / "commands.md"
text = doc.read_text(encoding="utf-8")
doc.write_text(text[: text.index("## Option reference")] + "\n".join(out).rstrip() + "\n", encoding="utf-8")
print(f"wrote the option reference of {doc}")
