"""Docs that cannot drift: the configuration reference is generated from the field docs and must
be current; every relative link in README.md and docs/*.md resolves (file and heading)."""

import re
from pathlib import Path

import pytest

from triaxis import cli
from triaxis.config import SECTIONS
from triaxis.config_doc import REGENERATE, fields_markdown, fields_text, section_fields

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MD = ROOT / "docs" / "config.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_config_reference_is_current():
    assert CONFIG_MD.exists(), f"docs/config.md is missing; generate it: {REGENERATE}"
    assert CONFIG_MD.read_text() == fields_markdown(), (
        f"docs/config.md is out of date with triaxis/config/sections.py; regenerate: {REGENERATE}"
    )


def test_config_reference_has_every_field_with_default_range_and_doc():
    text = CONFIG_MD.read_text()
    for section in SECTIONS:
        assert f"## [{section}]" in text
        for fd in section_fields(section):
            row = next(
                (
                    line
                    for line in text.splitlines()
                    if line.startswith(f"| `{fd.name}` |") and fd.doc.replace("|", "\\|") in line
                ),
                None,
            )
            assert row is not None, f"{section}.{fd.name} is not in docs/config.md"
            if fd.allowed:
                assert fd.allowed in row, (section, fd.name)
    # the field the hand-written README table had missed
    assert "| `fsdp_always` | `false` |" in text
    assert "| `lr` | `0.001` | >= 0 and <= 10 |" in text
    assert '| `pp_schedule` | `"1f1b"` | one of gpipe, 1f1b,' in text


def test_cli_prints_the_same_reference(capsys):
    assert cli.main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == fields_markdown()
    assert cli.main(["config", "--fields"]) == 0
    out = capsys.readouterr().out
    assert out == fields_text() + "\n"
    assert "  dp_shard = -1 [>= -1]\n" in out and "fsdp_always = False" in out


def test_readme_links_the_reference_instead_of_copying_it():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/config.md)" in readme
    assert "| `rope_low_freq_factor` |" not in readme  # no hand copy of the field table
    assert not list((ROOT / "triaxis").rglob("README_SECTION.md"))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _prose(path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.S | re.M)


def _links(path: Path) -> list[str]:
    prose = re.sub(r"`[^`\n]*`", "", _prose(path.read_text()))  # nor in inline code
    return re.findall(r"\]\(([^)\s]+)\)", prose)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        dest = (page.parent / target).resolve() if target else page
        if not dest.exists():
            broken.append(f"{link} (no file {dest.relative_to(ROOT)})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{link} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    (tmp_path / "there.md").write_text("# A heading: `code`\n")
    page.write_text(
        "[ok](there.md#a-heading-code) [gone](missing.md) `[code](no.md)`\n"
        "```\n[fenced](no.md)\n```\n"
    )
    assert _links(page) == ["there.md#a-heading-code", "missing.md"]
    assert "a-heading-code" in _anchors(tmp_path / "there.md")


# -- README's package layout: every folder and module, the core in data-flow order -------------

CORE = ["config/", "parallel/", "model/", "data/", "train/", "checkpoint/", "metrics/"]
OUTSIDE = [
    "launch.py",
    "launchers/",
    "plan/",
    "hf/",
    "net/",
    "generate.py",
    "cli.py",
    "__main__.py",
]


def _layout_names(readme: str) -> list[str]:
    """The first column of the README's "Package layout" block (`x.py`, `x/`), in order; a
    line indented past it continues the description above."""
    block = readme.split("\n## Package layout\n", 1)[1].split("```\n", 2)[1]
    names = []
    for line in block.splitlines():
        m = re.match(r"  (?! )([^#].*?)(?:\s{2,}|$)", line)
        if m:
            names += [n.strip() for n in m.group(1).split(",")]
    return names


def test_package_layout_lists_every_folder_and_module_in_data_flow_order():
    package = ROOT / "triaxis"
    actual = {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()} | {
        p.name for p in package.glob("*.py") if p.name != "__init__.py"
    }
    names = _layout_names((ROOT / "README.md").read_text())
    assert sorted(actual - set(names)) == [], "add these to README.md's Package layout"
    assert sorted(set(names) - actual) == [], "README.md's Package layout names these; gone?"
    at = [names.index(n) for n in CORE]
    assert at == sorted(at), f"the core is not in data-flow order: {CORE}"
    assert min(names.index(n) for n in OUTSIDE) > max(at), "launch, tools and CLI come after"


def test_package_layout_check_sees_a_missing_module():
    readme = (ROOT / "README.md").read_text()
    assert "storage.py" in _layout_names(readme)
    assert "storage.py" not in _layout_names(readme.replace("  storage.py ", "  ", 1))
