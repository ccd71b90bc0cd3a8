import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    slow = os.environ.get("SPARSEVIT_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow; set SPARSEVIT_SLOW=1"))
