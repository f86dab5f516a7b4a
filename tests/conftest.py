import pytest

from sandbox import Sandbox


@pytest.fixture
def sandbox(tmp_path):
    sb = Sandbox(tmp_path)
    yield sb
    sb.close()
