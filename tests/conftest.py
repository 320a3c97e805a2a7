import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _quiet_fallback_warnings():
    # Ops without a kernel fall back to the reference with one RuntimeWarning; the
    # tests that check that warning re-enable it themselves.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"steppo_fast::.*using the PyTorch reference")
        yield
