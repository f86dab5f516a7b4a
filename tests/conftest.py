import shutil

import pytest

from sandbox import Sandbox


@pytest.fixture
def sandbox(tmp_path):
    sb = Sandbox(tmp_path)
    yield sb
    sb.close()


@pytest.fixture(scope="session")
def bench_tools():
    """The virtual printer's firmware tree compiles real C: without its tools the tests
    that need it fail, saying which tool is missing."""
    missing = [t for t in ("gcc", "make", "objcopy", "git") if shutil.which(t) is None]
    assert not missing, (
        f"the virtual printer's firmware tree needs {', '.join(missing)} on PATH "
        "(Debian: apt-get install build-essential git)"
    )
