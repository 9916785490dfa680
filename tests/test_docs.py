"""The CLI reference and the artifact formats in docs/ are generated from the code and must be current."""

from hotcold.docgen import main


def test_generated_docs_are_current():
    assert main(["--check"]) == 0, "docs/cli.md or docs/artifacts.md is stale: run python -m hotcold.docgen"
