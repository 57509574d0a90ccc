import pytest


@pytest.fixture(scope="module")
def stories_cuda():
    """stories260K on the GPU, resolved through CBQ_MODELS_DIR or ../shared/models (the GPU
    machine has no ../shared); skipped when neither has it."""
    from cbq_ptq.models import load_model, resolve

    try:
        resolve("stories260K")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return load_model("stories260K", device="cuda")
