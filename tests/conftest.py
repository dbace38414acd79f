import os

import pytest
import torch

import _dist

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1)
_dist.refuse_relaunching_pytest()


@pytest.fixture(scope="session", autouse=True)
def _close_worlds():
    yield
    _dist.close_all()
