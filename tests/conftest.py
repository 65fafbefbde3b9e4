import os
import pathlib

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# phi-1's tokenizer files live beside the project (../shared), not in it; MEGAPHI_CODEGEN_TOKENIZER_DIR
# points elsewhere (e.g. a clone in another folder).
CODEGEN_TOKENIZER_DIR = pathlib.Path(os.environ.get(
    "MEGAPHI_CODEGEN_TOKENIZER_DIR", REPO_ROOT.parent / "shared" / "tokenizers" / "codegen-350M-mono"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture
def codegen_tokenizer_dir():
    """Path of the codegen-350M-mono tokenizer files shipped beside the project (../shared)."""
    if not (CODEGEN_TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip(f"codegen-350M-mono tokenizer files not found at {CODEGEN_TOKENIZER_DIR}")
    return CODEGEN_TOKENIZER_DIR


@pytest.fixture(autouse=True)
def _single_threaded_torch():
    # Tests on a 2-core machine: avoid oversubscription when several processes run.
    torch.set_num_threads(int(os.environ.get("MEGAPHI_TEST_THREADS", "1")))
    yield
