"""The README teaches only what is true: its failure map has a row for every failure and
names files, functions, tests and lab faults that exist; its contents link its sections;
its links resolve. Links are read as GitHub renders them, outside fenced code blocks."""

import re
from collections import Counter

from deploy.chaos import FAULTS, WATCHED
from tests.helpers import REPO

README = REPO / "README.md"

FAILURES = [
    "duplicate delivery",
    "double charge",
    "duplicate email",
    "commit-then-crash",
    "broker down",
    "broker frozen",
    "worker killed mid-task",
    "poison message",
    "retry storm",
    "rate-limited dependency",
    "growing dead letters",
    "starved queue",
    "stuck job",
    "silent failure",
    "out-of-order or late delivery",
    "visibility timeout redelivery",
    "unbounded growth",
    "unwatched failure",
]
COLUMNS = [
    "failure",
    "what goes wrong",
    "the answer in the code",
    "the test that makes it happen",
    "lab fault",
]

LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`]+)`")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `#` comment in a shell block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def readme_lines() -> list[str]:
    return prose_lines(README.read_text())


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text lowercased, punctuation but `-` and
    `_` dropped, spaces to `-` (a repeated heading gets -1, -2: see `anchors`)."""
    text = LINK.sub(r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(lines: list[str]) -> list[tuple[int, str]]:
    return [
        (len(match.group(1)), match.group(2)) for line in lines if (match := HEADING.match(line))
    ]


def anchors(lines: list[str], levels: range = range(1, 7)) -> set[str]:
    """The anchors of the headings of these levels (a repeat is numbered over all levels)."""
    seen: Counter[str] = Counter()
    result = set()
    for level, title in headings(lines):
        anchor = github_anchor(title)
        if level in levels:
            result.add(f"{anchor}-{seen[anchor]}" if seen[anchor] else anchor)
        seen[anchor] += 1
    return result


def section(lines: list[str], title: str) -> list[str]:
    """The lines of the `## title` section, up to the next `##` heading."""
    start = lines.index(f"## {title}") + 1
    end = next((n for n in range(start, len(lines)) if lines[n].startswith("## ")), len(lines))
    return lines[start:end]


def cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def failure_map() -> list[dict[str, str]]:
    table = [line for line in section(readme_lines(), "Failure map") if line.startswith("|")]
    assert len(table) > 2, "the failure map has no table"
    header, separator, *rows = table
    assert cells(header) == COLUMNS
    assert set(separator) <= set("|-: ")
    parsed = []
    for row in rows:
        values = cells(row)
        assert len(values) == len(COLUMNS), f"a row with {len(values)} cells: {row[:80]}"
        parsed.append(dict(zip(COLUMNS, values, strict=True)))
    return parsed


def links(text: str) -> list[tuple[str, str]]:
    return LINK.findall(text)


def defines(path: str, name: str, *, kinds: str = "def|class") -> bool:
    pattern = rf"^\s*(?:async\s+)?(?:{kinds})\s+{re.escape(name)}\b"
    return re.search(pattern, (REPO / path).read_text(), re.M) is not None


def is_relative(target: str) -> bool:
    return not target.startswith("#") and re.match(r"^[a-z][a-z0-9+.-]*:", target) is None


def test_github_anchors_are_computed_as_github_does():
    assert github_anchor("Failure lab: `make chaos`") == "failure-lab-make-chaos"
    assert github_anchor("What an operator's decision means") == "what-an-operators-decision-means"
    assert github_anchor("How it works, in short") == "how-it-works-in-short"
    assert github_anchor("Commit-then-crash and snake_case") == "commit-then-crash-and-snake_case"
    assert anchors(["## Tests", "### Tests"]) == {"tests", "tests-1"}
    assert headings(prose_lines("```sh\n# a comment\n```\n## Real")) == [(2, "Real")]


def test_the_failure_map_has_a_row_for_every_failure():
    named = Counter(row["failure"].strip("*_ ").lower() for row in failure_map())

    assert [failure for failure in FAILURES if failure not in named] == []
    assert [failure for failure, count in named.items() if count > 1] == []


def test_every_file_the_failure_map_links_exists():
    targets = [
        target for row in failure_map() for cell in row.values() for _, target in links(cell)
    ]

    assert targets  # the links were found
    relative = [target.split("#")[0] for target in targets if is_relative(target)]
    assert [target for target in relative if not (REPO / target).is_file()] == []


def test_every_function_the_failure_map_names_is_defined_in_the_file_it_links():
    missing, malformed, named = [], [], 0
    for row in failure_map():
        answers = links(row["the answer in the code"])
        if not answers:
            malformed.append(f"{row['failure']}: no code linked")
        for text, target in answers:
            # [`path` `function`](path), or [`path`](path) for a file as a whole
            path, *function = CODE.findall(text) or [""]
            if path != target or len(function) > 1 or not (REPO / target).is_file():
                malformed.append(f"{row['failure']}: [{text}]({target})")
            elif function:
                named += 1
                if not defines(target, function[0]):
                    missing.append(f"{row['failure']}: {target} {function[0]}")

    assert named >= len(FAILURES)  # the functions were found
    assert malformed == []
    assert missing == []


def test_every_test_the_failure_map_names_exists_in_the_file_it_links():
    missing, malformed = [], []
    for row in failure_map():
        cell = row["the test that makes it happen"]
        found = links(cell)
        if not found and not cell.lower().startswith("none"):
            malformed.append(f"{row['failure']}: no test linked, and it does not say none")
        for text, target in found:
            name = text.strip("`")
            if not (re.fullmatch(r"test_\w+", name) and target.startswith("tests/")):
                malformed.append(f"{row['failure']}: [{text}]({target})")
            elif not (REPO / target).is_file() or not defines(target, name, kinds="def"):
                missing.append(f"{row['failure']}: {target}::{name}")

    assert malformed == []
    assert missing == []


def test_every_lab_fault_the_failure_map_names_is_one_the_lab_injects():
    unknown, unsaid = [], []
    for row in failure_map():
        cell = row["lab fault"]
        faults = CODE.findall(cell)
        if not faults and not cell.lower().startswith("none"):
            unsaid.append(row["failure"])
        known = [*FAULTS, *WATCHED]  # the mixed faults, and those held until alerts fire
        unknown += [f"{row['failure']}: {fault}" for fault in faults if fault not in known]

    assert unsaid == []
    assert unknown == []


def contents(lines: list[str]) -> list[str]:
    """The anchors the table of contents (`**Contents:**` up to a blank line) links."""
    start = next(n for n, line in enumerate(lines) if line.startswith("**Contents:**"))
    end = next(n for n in range(start, len(lines)) if not lines[n].strip())
    return [target for line in lines[start:end] for _, target in links(line)]


def test_the_contents_link_every_section_and_every_anchor_resolves():
    lines = readme_lines()
    targets = contents(lines)
    sections = anchors(lines, levels=range(2, 4))  # `##` and `###`

    assert len(targets) > 10  # the contents were found
    assert all(target.startswith("#") for target in targets)
    assert [target for target in targets if target[1:] not in sections] == []
    # every `##` section is in the contents
    listed = [github_anchor(title) for level, title in headings(lines) if level == 2]
    assert [anchor for anchor in listed if f"#{anchor}" not in targets] == []
    # and every link to a heading anywhere in the README finds it
    in_page = [target for line in lines for _, target in links(line) if target.startswith("#")]
    assert [target for target in in_page if target[1:] not in anchors(lines)] == []


def test_every_relative_link_in_the_readme_resolves_to_a_file():
    lines = [CODE.sub("", line) for line in readme_lines()]  # `[a](b)` in code is no link
    targets = [target for line in lines for _, target in links(line) if is_relative(target)]

    assert len(targets) > 20  # the links were found
    missing = sorted({t for t in targets if not (REPO / t.split("#")[0]).exists()})
    assert missing == []
