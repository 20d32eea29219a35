"""The README's configuration reference is the one generated from the settings object."""

from __future__ import annotations

from tinymlops.settings import REPO_ROOT, settings_reference_markdown

START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def test_readme_configuration_reference_is_generated() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index(START) + len(START) : readme.index(END)]
    assert section == settings_reference_markdown(), "regenerate with: tinymlops config --reference"
