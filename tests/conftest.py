"""Test-wide setup: CPU only, 8 fake devices, absl flags parsed (Grain reads them)."""

import os
import sys

# Both must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


def pytest_collection_modifyitems(config, items):
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        skip = pytest.mark.skip(reason="libtpu is not installed: pip install -e '.[tpu]' to run it")
        for item in items:
            if "tpu_backend" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """CLIs under test call `logging.basicConfig(stream=sys.stdout, force=True)` while pytest's
    capture stands in for sys.stdout; once that capture is closed, every later log record of the
    worker would print a "--- Logging error ---" block. They also quieten named loggers ("absl"
    to WARNING), which would hide later tests' absl INFO records from caplog. Each test gets the
    root handlers and every logger's level back."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {
        name: lg.level
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lg in logging.root.manager.loggerDict.items():
        if isinstance(lg, logging.Logger) and lg.level != levels.get(name, logging.NOTSET):
            lg.setLevel(levels.get(name, logging.NOTSET))
