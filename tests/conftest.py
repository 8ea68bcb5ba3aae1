import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # The tests use tiny tensors: one thread avoids oversubscription on small CI machines.
    torch.set_num_threads(1)
