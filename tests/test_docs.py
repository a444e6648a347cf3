"""The documentation stays small, linked and true: sizes, README sections, relative links, commands' options."""

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
MAX_DOC_BYTES = 30 * 1024
# Markdown files whose links and commands are checked: the README, everything under docs/, research's README.
CHECKED_MARKDOWN = [README, REPO_ROOT / "MODEL_CARD.md", REPO_ROOT / "research" / "README.md", *sorted(DOCS.rglob("*.md"))]

INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SCRIPT_CALL = re.compile(r"scripts/(\w+)\.py\b")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
# Repository paths named in the text, e.g. `model/decode.py` or scripts/predict.py (relative to the repository root)
REPOSITORY_PATH = re.compile(
    r"(?<![\w./-])((?:app|model|scripts|templates|static|tests|benchmarks|research|deploy|pacs|store)/"
    r"[\w./-]*\w\.(?:py|sh|html|md|css|js|conf|json|png|ini))")
# scripts/loso.py takes every option of scripts/train.py as well as its own
INHERITED_OPTIONS = {"loso": ("train",)}


def relative(path):
    """A path as shown in failure messages."""
    return path.relative_to(REPO_ROOT).as_posix()


def heading_anchors(markdown):
    """GitHub's anchors for the headings of a Markdown text (lower case, punctuation dropped, spaces to hyphens)."""
    anchors = set()
    text = FENCE.sub("", markdown)
    for line in text.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            title = re.sub(r"[^\w\- ]", "", match.group(1).lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def relative_links(markdown):
    """Link targets in a Markdown text that point inside the repository (no scheme, not a bare anchor)."""
    text = FENCE.sub("", markdown)
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [target for target in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", target) and target.strip()]


def script_commands(markdown):
    """(script name, options) for each command line in the fenced code blocks that runs ``scripts/NAME.py``."""
    commands = []
    for block in FENCE.findall(markdown):
        joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in joined.splitlines():
            line = line.split(" #", 1)[0]
            for piece in re.split(r"\|\||&&|[|;]", line):
                calls = list(SCRIPT_CALL.finditer(piece))
                for index, call in enumerate(calls):
                    end = calls[index + 1].start() if index + 1 < len(calls) else len(piece)
                    commands.append((call.group(1), OPTION.findall(piece[call.end():end])))
    return commands


def defined_options(script):
    """The options a script defines, read from its source (``"--name"`` literals), with inherited ones."""
    options = set()
    for name in (script, *INHERITED_OPTIONS.get(script, ())):
        options |= set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", (REPO_ROOT / "scripts" / f"{name}.py").read_text()))
    return options


@pytest.mark.parametrize("path", sorted(DOCS.rglob("*.md")), ids=relative)
def test_no_markdown_file_under_docs_is_over_30_kb(path):
    assert path.stat().st_size <= MAX_DOC_BYTES, (
        f"{relative(path)} is {path.stat().st_size / 1024:.1f} KB; split it or move notebook material to research/")


def test_the_size_check_sees_the_docs():
    assert len(list(DOCS.rglob("*.md"))) >= 5, "docs/ should hold the app, security, DICOM, data and model docs"


@pytest.mark.parametrize("word", ["API", "Batch"])
def test_readme_has_a_section_heading_with(word):
    headings = [line for line in README.read_text().splitlines() if line.startswith("#")]
    assert any(word in heading for heading in headings), f"README.md has no heading containing {word!r}: {headings}"


@pytest.mark.parametrize("path", CHECKED_MARKDOWN, ids=relative)
def test_every_relative_link_points_to_an_existing_file(path):
    text = path.read_text()
    broken = []
    for target in relative_links(text):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{relative(path)} has broken links: {broken}"


@pytest.mark.parametrize("path", CHECKED_MARKDOWN, ids=relative)
def test_documented_commands_use_only_options_their_script_defines(path):
    unknown = []
    for script, options in script_commands(path.read_text()):
        if not (REPO_ROOT / "scripts" / f"{script}.py").exists():
            unknown.append(f"scripts/{script}.py (no such script)")
            continue
        unknown += [f"scripts/{script}.py {option}" for option in options if option not in defined_options(script)]
    assert not unknown, f"{relative(path)} documents options that do not exist: {unknown}"


def test_the_training_options_table_names_only_real_options():
    rows = [line for line in (DOCS / "model" / "training.md").read_text().splitlines() if line.startswith("| `--")]
    assert rows, "docs/model/training.md should have its options table"
    named = {option for row in rows for option in OPTION.findall(row.split("|")[1])}
    assert not named - defined_options("train"), f"not options of scripts/train.py: {sorted(named - defined_options('train'))}"


@pytest.mark.parametrize("path", CHECKED_MARKDOWN, ids=relative)
def test_every_repository_path_named_in_the_text_exists(path):
    missing = sorted({name for name in REPOSITORY_PATH.findall(path.read_text()) if not (REPO_ROOT / name).exists()})
    assert not missing, f"{relative(path)} names files that do not exist: {missing}"


@pytest.mark.parametrize("path", CHECKED_MARKDOWN, ids=relative)
def test_no_documented_command_writes_over_the_shipped_model(path):
    for block in FENCE.findall(path.read_text()):
        assert not re.search(r"--output[ =]models/default\.pt", block), (
            f"{relative(path)}: an example writes models/default.pt; write exports under runs/ instead")


def test_the_link_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](page.md#title) [gone](missing.md) [anchor](page.md#nowhere) [web](https://x.org)\n")
    text = page.read_text()
    targets = relative_links(text)
    assert targets == ["page.md#title", "missing.md", "page.md#nowhere"]
    assert heading_anchors(text) == {"title"}


def test_the_path_finder_sees_module_paths():
    text = "decode in `model/decode.py`, then scripts/predict.py; not runs/x/model/y.py or https://a.org/app/b.py"
    assert REPOSITORY_PATH.findall(text) == ["model/decode.py", "scripts/predict.py"]


def test_the_command_parser_reads_continued_lines():
    markdown = "```bash\n.venv/bin/python scripts/train.py --data D \\\n    --preset tutorial  # a comment --not-this\n```\n"
    assert script_commands(markdown) == [("train", ["--data", "--preset"])]
