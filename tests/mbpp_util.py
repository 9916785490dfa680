"""Where the tests find MBPP, and the one reason they skip without it.

MBPP (Austin et al. 2021) is never vendored. The tests read it from `$HOTCOLD_MBPP`, else from the first
`shared/data/mbpp.jsonl` in the repository or one of its parents (CI has `../shared` beside the clone).
Without it, the tests that need real MBPP skip, all with the same reason; everything else runs on
hotcold's embedded tasks. `HOTCOLD_REQUIRE_MBPP=1` (set by .ci/run) turns that skip into a failure, so a
CI run that lost its MBPP cannot pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hotcold.workloads import find_mbpp

REPO = Path(__file__).resolve().parents[1]
MBPP_URL = "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/mbpp.jsonl"
SKIP_REASON = (f"needs MBPP: no $HOTCOLD_MBPP and no shared/data/mbpp.jsonl above {REPO}; download {MBPP_URL} "
               "and set HOTCOLD_MBPP=/path/to/mbpp.jsonl")


def find_test_mbpp() -> Path | None:
    """$HOTCOLD_MBPP (which must then exist), else shared/data/mbpp.jsonl in the repo or a parent."""
    env = os.environ.get("HOTCOLD_MBPP")
    if env:
        if not Path(env).is_file():
            pytest.fail(f"HOTCOLD_MBPP={env} is not a file: point it at mbpp.jsonl or unset it", pytrace=False)
        return Path(env)
    return find_mbpp(REPO)


def require_mbpp() -> Path:
    """MBPP's path, or skip the calling test (fail under HOTCOLD_REQUIRE_MBPP=1)."""
    path = find_test_mbpp()
    if path is None:
        if os.environ.get("HOTCOLD_REQUIRE_MBPP") == "1":
            pytest.fail(f"HOTCOLD_REQUIRE_MBPP=1 but MBPP is missing ({SKIP_REASON})", pytrace=False)
        pytest.skip(SKIP_REASON)
    return path
