"""The README is what a user needs; measurements live in docs/, each table with the command and
the commit that made it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^-?\d+(\.\d+(%|x| s| ms)?|(\.\d+)?(%|x| s| ms))$")
"""A measured figure (12.5, 40%, 2.3x): a count such as 0 or a formula is not one."""
PROVENANCE = re.compile(r"commit [0-9a-f]{7}")


def tables(text: str) -> list[tuple[int, list[str]]]:
    """(line of the header, data rows) of every Markdown table."""
    lines, found = text.split("\n"), []
    for i, line in enumerate(lines):
        if line.strip().startswith("|---"):
            rows = []
            for row in lines[i + 1:]:
                if not row.strip().startswith("|"):
                    break
                rows.append(row.strip())
            found.append((i - 1, rows))
    return found


def measured(rows: list[str]) -> bool:
    return any(NUMBER.match(cell.strip()) for row in rows for cell in row.strip("|").split("|"))


def test_readme_is_short_and_has_what_a_user_needs():
    text = (ROOT / "README.md").read_text()
    assert len(text.split("\n")) <= 300
    for section in ("Quick start", "Command line", "Python", "Dataset runs on Ray", "HTTP endpoint", "Cluster",
                    "Benchmark", "Status", "Tests"):
        assert re.search(rf"^## {section}", text, re.M), section
    assert "<!-- bench:start -->" in text and "<!-- bench:end -->" in text  # `make bench` refreshes it


def test_every_doc_the_readme_names_exists_and_every_doc_is_named():
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"\(docs/([\w-]+\.md)\)", text))
    assert named == {p.name for p in (ROOT / "docs").glob("*.md")}


def test_every_measured_table_names_its_commit():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text().split("\n")
        for header, rows in tables(path.read_text()):
            if not measured(rows):
                continue
            before = "\n".join(lines[max(0, header - 12): header])
            assert PROVENANCE.search(before), f"{path.name}:{header + 1}: a table of figures with no commit"
