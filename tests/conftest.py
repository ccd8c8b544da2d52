"""Test-wide settings: no network, ever; one torch thread per process when pytest runs two."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two pytest workers share two cores: torch's threads spin-wait for each other, so a worker
    # taking both cores beside another busy one slows every parallel step many times over.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
