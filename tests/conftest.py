"""Shared test setup.

TRITON_INTERPRET must be set before the first `@triton.jit` is imported, so it is set here, at collection start,
whenever no CUDA device is present: Triton kernels then run on the CPU interpreter (slow: tests use small shapes).

One intra-op thread for the whole suite, and (through OMP_NUM_THREADS, unless set) for every process a test
starts (the GPU-session dry run, DDP/FSDP workers, CLI subprocesses): the tests' models are tiny, so a second
thread buys little, while on a 2-core CI machine with one core busy torch's OpenMP threads spin-wait and the
suite took 3-10x longer (13 min instead of ~4). Set OMP_NUM_THREADS to use more.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, and inherited by subprocesses

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread (and far faster on a busy machine, where OpenMP threads
    spin-wait); restored after the module. Use with `pytestmark = pytest.mark.usefixtures("one_thread")` (the
    suite already runs on OMP_NUM_THREADS threads, 1 by default: this pins 1 even when more were asked for)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _padded_batches_stay_padded(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU fastsel runs a padded batch packed (layout 'auto'); on CUDA it stays padded. The suite tests the
    padded path as a GPU runs it, so padded batches stay padded here, except in tests marked `auto_layout`
    (tests/engine/test_layout.py), which check the CPU default itself."""
    if request.node.get_closest_marker("auto_layout") is None:
        monkeypatch.setattr("fastsel.engine.model_io.AUTO_PACK_DEVICES", ())
