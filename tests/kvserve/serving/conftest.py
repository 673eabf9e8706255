"""One SmolLM2 instance per test session for the serving tests (1 torch thread)."""
import pytest


@pytest.fixture(scope="session")
def serving_model():
    pytest.importorskip("transformers")
    import torch

    from kvserve.models import load_model_fast

    torch.set_num_threads(1)
    try:
        return load_model_fast("smollm2")
    except Exception as exc:  # model package missing
        pytest.skip(f"SmolLM2 unavailable: {exc}")
