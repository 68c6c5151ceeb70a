"""The swap tests run tiny models, where OpenMP threads cost more than they bring (and spin badly on a
loaded machine): one thread, restored afterwards.  Kernels' threading is tested in tests/ops."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
