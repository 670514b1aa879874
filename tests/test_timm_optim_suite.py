"""timm's own optimizer tests (``tests/test_optim.py`` of timm's source distribution at the installed version)
with ltsam's optimizers registered: every registry-parametrised item of sam, imbsam, ssesam and focalsam passes or
is one of ``timm_optim_suite.EXPECTED_FAILURES`` failing with the error named there.

The sdist is fetched before the tests, never by them: ``.ci/run`` runs
``pip download --no-deps --no-binary :all: timm==<installed> -d .ci/cache`` (``LTSAM_TIMM_SDIST_DIR`` points
elsewhere).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

from ltsam_common.names import SAM_METHODS

TESTS = Path(__file__).resolve().parent
SDIST_DIR = Path(os.environ.get("LTSAM_TIMM_SDIST_DIR", TESTS.parent / ".ci" / "cache"))


def test_timms_optimizer_suite_with_ltsam_registered(tmp_path):
    """Also: importing ltsam adds its names to timm's registry and changes no other record (what the suite sees
    of the other optimizers is untouched)."""
    pytest.importorskip("expecttest", reason="timm's test_optim.py imports torch.testing._internal (needs expecttest)")
    sdist = SDIST_DIR / f"timm-{timm.__version__}.tar.gz"
    if not sdist.is_file():
        pytest.skip(f"no timm source distribution at {sdist}: run `pip download --no-deps --no-binary :all: "
                    f"timm=={timm.__version__} -d {SDIST_DIR}` (as .ci/run does)")
    prefix = f"timm-{timm.__version__}/tests/"
    with tarfile.open(sdist) as archive:  # timm's tests only: the installed timm is the one under test
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.isfile()]
        archive.extractall(tmp_path, members=members, filter="data")
    root = tmp_path / f"timm-{timm.__version__}"
    script = ("import json, sys, pytest, timm.optim as o; sys.path.insert(0, sys.argv[1]); "
              "records = lambda: {n: repr(o.get_optimizer_info(n)) for n in o.list_optimizers()}; "
              "before = records(); import ltsam; after = records(); "
              "print(json.dumps([sorted(set(after) - set(before)), [n for n in before if after[n] != before[n]]])); "
              "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-p', 'timm_optim_suite', "
              "'tests/test_optim.py', '-rfE', '--tb=short']))")
    env = {**os.environ, "TORCH_DEVICE": "cpu"}
    # subprocess.run kills the child when the timeout expires
    result = subprocess.run([sys.executable, "-c", script, str(TESTS)], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    added, changed = json.loads(result.stdout.splitlines()[0])
    assert added == sorted(SAM_METHODS) and changed == []
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|xfailed|failed|error)", summary)}
    assert counts.get("passed", 0) >= 1 and counts.get("xfailed", 0) >= 1, summary

