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


@pytest.fixture(scope="session", autouse=True)
def _tree_cache(tmp_path_factory):
    """`auto` trees are measured into a session directory, never the user's ~/.cache (CLI subprocesses inherit it)."""
    import os

    old = os.environ.get("MMSPEC_CACHE_DIR")
    os.environ["MMSPEC_CACHE_DIR"] = str(tmp_path_factory.mktemp("mmspec-cache"))
    yield
    if old is None:
        os.environ.pop("MMSPEC_CACHE_DIR", None)
    else:
        os.environ["MMSPEC_CACHE_DIR"] = old
