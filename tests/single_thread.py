"""A fixture the pruning-method tests share: their tensors are tiny, so torch's second thread only
adds OpenMP spin-waits (seconds per test on a busy 2-core CI machine)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
