"""Docs that cannot rot: every `nfed ...` line in a shell block of README.md and docs/*.md names a command that
exists and options it accepts (parsed through click, nothing run), and every relative link and #anchor resolves.
A renamed option or a moved section then fails here, not in a user's terminal."""
from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import click
import pytest

from nfed.cli import cli as nfed_group

REPO_ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";"}


def doc_files(root: Path = REPO_ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the first line, lines) of each fenced block in a shell language or none."""
    blocks, current, start, language = [], None, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence and current is None:
            current, start, language = [], number + 1, fence.group(1).lower()
        elif fence:
            if language in SHELL_LANGUAGES:
                blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def logical_lines(block: list[str], first: int) -> list[tuple[int, str]]:
    """Lines joined over a trailing backslash, and usage lines continued by an indented `[--option ...`."""
    joined: list[tuple[int, str]] = []
    pending = False
    for offset, line in enumerate(block):
        continues = pending or (joined and re.match(r"^\s+\[", line) and "nfed" in joined[-1][1])
        text = line.rstrip()
        if continues and joined:
            joined[-1] = (joined[-1][0], joined[-1][1] + " " + text.rstrip("\\").strip())
        else:
            joined.append((first + offset, text.rstrip("\\")))
        pending = text.endswith("\\")
    return joined


def nfed_commands(line: str) -> list[list[str]]:
    """The argument lists of the `nfed` invocations on one shell line (comments, `[`/`]` of usage syntax and `|`
    between alternatives dropped; `.venv/bin/nfed` counts as `nfed`)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:   # an unbalanced quote in prose: split on blanks
        tokens = line.split("#", 1)[0].split()
    commands, current, depth = [], None, 0
    for token in tokens:
        if token in SEPARATORS or (token == "|" and depth == 0):
            current = None
            continue
        depth += token.count("[") - token.count("]")
        if current is None:
            if token == "nfed" or token.endswith("/nfed"):
                current = []
                commands.append(current)
            else:
                current = False   # another program: its arguments are not ours
            continue
        if current is False:
            continue
        token = token.replace("[", "").replace("]", "")
        if token and token != "|":
            current.append(token)
    return commands


def check_command(args: list[str]) -> str | None:
    """None when `nfed ARGS` names a command and every option given is one it accepts; else why not."""
    return _check(nfed_group, ["nfed"], list(args))


def _check(command: click.Command, path: list[str], args: list[str]) -> str | None:
    """Walk down the groups (each of `a|b` alternatives must take the rest), then match the options with the
    command's own click parser: unknown options and options without their value fail; values are not converted,
    so placeholders such as RUN or N pass (`make_context(resilient_parsing=True)` would hide unknown options)."""
    if isinstance(command, click.Group) and args and not args[0].startswith("-"):
        context = click.Context(command)
        for name in args[0].split("|"):
            sub = command.get_command(context, name)
            problem = (f"{' '.join(path)}: no command {name!r}" if sub is None
                       else _check(sub, [*path, name], args[1:]))
            if problem:
                return problem
        return None
    try:
        command.make_parser(click.Context(command, info_name=" ".join(path))).parse_args(list(args))
    except click.UsageError as exc:
        return f"{' '.join(path)}: {exc.format_message()}"
    return None


def command_problems(text: str, name: str = "doc") -> list[str]:
    """Every `nfed` line of the shell blocks in `text` that does not parse, as 'name:line: args: why'."""
    problems = []
    for first, block in shell_blocks(text):
        for number, line in logical_lines(block, first):
            for args in nfed_commands(line):
                problem = check_command(args)
                if problem:
                    problems.append(f"{name}:{number}: nfed {' '.join(args)}: {problem}")
    return problems


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lower case, punctuation dropped (letters,
    digits, `_`, `-` and spaces kept), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[`*]|<[^>]+>", "", text).lower()
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The heading anchors of a markdown text, duplicates numbered as GitHub does (-1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        heading = re.match(r"^#{1,6} (.+?)\s*#*$", line)
        if fence or not heading:
            continue
        slug = github_slug(heading.group(1))
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def link_problems(path: Path, text: str | None = None) -> list[str]:
    """Relative links and #anchors of one markdown file (outside code) that point at nothing."""
    text = path.read_text(encoding="utf-8") if text is None else text
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.name}: {target}: no file {file_part}")
        elif anchor and linked.suffix == ".md":
            own = text if linked == path else linked.read_text(encoding="utf-8")
            if anchor not in anchors(own):
                problems.append(f"{path.name}: {target}: no heading #{anchor} in {linked.name}")
    return problems


def test_every_nfed_command_in_the_docs_parses():
    problems = [problem for path in doc_files() for problem in command_problems(path.read_text(encoding="utf-8"),
                                                                                path.relative_to(REPO_ROOT))]
    assert not problems, "\n".join(problems)


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    problems = [problem for path in doc_files() for problem in link_problems(path)]
    assert not problems, "\n".join(problems)


def test_the_docs_hold_the_commands_they_are_checked_on():
    """The checker sees the quick start and the usage blocks: without them the test above would pass on nothing."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = [args for _, block in shell_blocks(readme) for _, line in logical_lines(block, 1)
                for args in nfed_commands(line)]
    assert ["demo", "--out", "demo-run"] in commands
    federation = (REPO_ROOT / "docs" / "federation.md").read_text(encoding="utf-8")
    usage = [args for _, block in shell_blocks(federation) for _, line in logical_lines(block, 1)
             for args in nfed_commands(line) if args[:1] == ["federate"]]
    assert any("--norm-policy" in args and "--simulate-attack" in args for args in usage)


BROKEN_SNIPPET = """
```bash
nfed federate --data packs --out runs/fed --roundz 5     # a renamed option
nfed train-locall --data packs --out runs/local           # a renamed command
.venv/bin/nfed bench step --widht 8                        # a typo in a subcommand's option
```

```
nfed demo [--out nfed-demo] [--seeds 1]
  [--no-such-option X]
```
"""


def test_the_command_checker_fails_on_a_broken_snippet():
    problems = command_problems(BROKEN_SNIPPET)
    assert len(problems) == 4, problems
    assert "--roundz" in problems[0] and "train-locall" in problems[1] and "--widht" in problems[2]
    assert "--no-such-option" in problems[3]


def test_the_command_checker_accepts_usage_syntax():
    good = """
```bash
nfed federate --data PACKS --out RUN [--rounds 20] [--resume | --overwrite] \\
    [--device cpu|cuda[:N]]   # a comment --not-an-option
python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/nfed demo --out demo-run
nfed bench kernels|aggregate --device cuda
git clone <nfed repository> nfed && cd nfed
```
"""
    assert command_problems(good) == []
    assert command_problems(good.replace("kernels|aggregate", "kernels|aggregat"))
    assert command_problems(good.replace("--device cuda", "--device cuda --precision tf32"))   # aggregate has none


def test_the_link_checker_fails_on_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: `nfed x` (v2)\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Same\n\n## Same\n\n"
                    "[ok](other.md#a-section-nfed-x-v2) [ok](#same-1) [ok](https://example.org/#x)\n"
                    "[gone](missing.md) [bad anchor](other.md#a-section) [bad own](#nowhere)\n"
                    "`[in code](missing2.md)`\n", encoding="utf-8")
    problems = link_problems(page)
    assert len(problems) == 3, problems
    assert "missing.md" in problems[0] and "#a-section" in problems[1] and "#nowhere" in problems[2]


@pytest.mark.parametrize("heading, slug", [
    ("The study's table: `nfed report --run RUN [--run RUN2 ...] --out REPORT`",
     "the-studys-table-nfed-report---run-run---run-run2----out-report"),
    ("For GIS users: GeoTIFF in, GeoJSON and overlay out", "for-gis-users-geotiff-in-geojson-and-overlay-out"),
    ("Robust aggregation and differential privacy (bench_attacks.py, bench_privacy.py)",
     "robust-aggregation-and-differential-privacy-bench_attackspy-bench_privacypy"),
    ("GPU (CuPy)", "gpu-cupy"),
])
def test_github_slugs(heading, slug):
    assert github_slug(heading) == slug
