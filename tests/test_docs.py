"""The README and docs/ link only to files and headings that exist, and the README keeps its two commands."""

import re

from conftest import REPO


def _anchors(markdown: str) -> set[str]:
    """GitHub-style heading anchors."""
    found = set()
    for line in markdown.splitlines():
        match = re.match(r"^#+\s+(.*)", line)
        if match:
            found.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return found


def test_relative_links_and_anchors_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path) if path else page
            if not target.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text()):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken, broken
    assert len(pages) >= 8


def test_readme_has_exactly_the_two_commands():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert len(commands) == 2
    demo, tests = (c.strip() for c in commands)
    assert "examples/demo.py" in demo and "pytest" in tests
    assert all("-c constraints.txt" in c for c in (demo, tests))
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci  # CI runs the README's test command verbatim
