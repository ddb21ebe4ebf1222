"""The documentation a user reads: a short README whose links lead somewhere, every option of every command in
docs/commands.md, and measurements that name their command, machine and date rather than a working session."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Words that date a text by who wrote it when, not by what was measured where.
SESSION_WORDS = re.compile(r"this session|the issue\b|issue's|previous round|earlier session|this round|last round|"
                           r"last session|next session", re.I)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):
            yield target


def test_readme_is_short_and_links_into_docs():
    readme = ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 250
    linked = {t.split("#")[0] for t in _links(readme) if t.startswith("docs/")}
    assert len({t for t in linked if (ROOT / t).is_file()}) >= 3, linked


@pytest.mark.parametrize("doc", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_links_and_anchors_resolve(doc):
    broken = []
    for target in _links(doc):
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target)
    assert broken == []


def test_no_session_wording():
    files = [ROOT / "README.md", *DOCS, ROOT / "models" / "registry.toml", *sorted((ROOT / "memcli").rglob("*.py"))]
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in files
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if SESSION_WORDS.search(line)]
    assert found == []


def _commands():
    import typer

    from memcli.cli.app import app

    def walk(group, prefix):
        for name, sub in sorted(group.commands.items()):
            if hasattr(sub, "commands"):  # a group (typer vendors its own click)
                yield from walk(sub, [*prefix, name])
            else:
                yield " ".join([*prefix, name]), sub

    return list(walk(typer.main.get_command(app), []))


def test_every_option_of_every_command_is_in_commands_md():
    """docs/commands.md's option reference names every option `memcli ... --help` shows, under its command."""
    text = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    reference = text[text.index("## Option reference"):]
    sections = dict(re.findall(r"^### `memcli ([^`]+)`\n(.*?)(?=^### |\Z)", reference, flags=re.M | re.S))
    missing = []
    for name, command in _commands():
        options = [o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
        section = sections.get(name, "")
        missing += [f"{name} {o}" for o in options if f"`{o}`" not in section]
    assert missing == [], "run python docs/option_reference.py"
