import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread():
    """The tiny models here are far faster on one thread than on two threads of a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
