import pytest

from tiny_models import build_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """family -> directory of a saved tiny random-weight checkpoint, built once per session."""
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny(family, tmp_path_factory.mktemp(family), seed=0)
        return built[family]

    return get
