import os
import pathlib
import sys

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
# Tests live in one folder per package (tests/data, tests/training, ...); the shared helpers
# (dist_utils, comparison_tolerances, ...) stay in tests/, and tests import each other's helpers by
# module name (from test_resume import run_pretrain): every test folder is importable.
for folder in [
    TESTS,
    *sorted(p for p in TESTS.iterdir() if p.is_dir() and p.name.isidentifier() and any(p.glob("test_*.py"))),
]:
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
# phi-1's tokenizer files live beside the project (../shared), not in it; MEGAPHI_CODEGEN_TOKENIZER_DIR
# points elsewhere (e.g. a clone in another folder).
CODEGEN_TOKENIZER_DIR = pathlib.Path(
    os.environ.get("MEGAPHI_CODEGEN_TOKENIZER_DIR", REPO_ROOT.parent / "shared" / "tokenizers" / "codegen-350M-mono")
)


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


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _launcher_variables_restored():
    # A test that runs megaphi.pretrain.main in-process sets RANK/MASTER_PORT (as a plain run does); left
    # behind, they make every later subprocess believe a launcher started it, on a port still held here.
    saved = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
