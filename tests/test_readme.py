"""The README's configuration reference is the one generated from the settings object."""

from __future__ import annotations

from tinymlops.settings import REPO_ROOT, settings_reference_markdown

START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def test_readme_configuration_reference_is_generated() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index(START) + len(START) : readme.index(END)]
    assert section == settings_reference_markdown(), "regenerate with: tinymlops config --reference"


def test_readme_benchmark_table_is_made_from_the_committed_results() -> None:
    import json

    from tinymlops.bench import README_BENCH_END, README_BENCH_START, bench_table_markdown

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index(README_BENCH_START) + len(README_BENCH_START) : readme.index(README_BENCH_END)]
    figures = json.loads((REPO_ROOT / "bench" / "results.json").read_text())
    assert section == bench_table_markdown(figures), "regenerate with: tinymlops bench --render-readme"
    assert figures["quick"] is False, "the committed figures must come from a full run"
