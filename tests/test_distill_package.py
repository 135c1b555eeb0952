"""The rkd.distill package as a whole: what importing it needs."""

from __future__ import annotations

import subprocess
import sys


def test_importing_distill_needs_no_pywavelets() -> None:
    """PyWavelets is imported when a wavelet is first asked for, never by ``import rkd.distill``."""
    code = "import sys; sys.modules['pywt'] = None; import rkd.distill; print(len(rkd.distill.KD_METHODS))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) > 0
