"""Model registry and perplexity on the real tiny model (stories260K in ../shared)."""

import pytest
import torch

from cbq_ptq.data import SHARED_DATA
from cbq_ptq.evaluate import evaluate_perplexity
from cbq_ptq.models import SHARED_MODELS, arch_spec, blocks, load_model
from tests.conftest import need_shared


@pytest.fixture(scope="module")
def stories():
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    return load_model("stories260K")


def test_registry_names_every_linear(stories):
    model, _ = stories
    spec = arch_spec(model)
    block = blocks(model)[0]
    for name in spec.linears:
        assert isinstance(block.get_submodule(name), torch.nn.Linear)
    assert len(blocks(model)) == 5


def test_unknown_architecture_is_a_clear_error():
    class Fake:
        class config:  # mimics a model config attribute
            model_type = "gpt_neox"

    with pytest.raises(ValueError, match="unknown architecture 'gpt_neox'"):
        arch_spec(Fake())


@pytest.mark.slow
def test_stories260k_perplexity_matches_the_reference(stories):
    """shared/README.md: 5.32 on tinystories-valid-prefix.txt, 512-token windows with BOS."""
    need_shared(SHARED_DATA / "tinystories-valid-prefix.txt")
    model, tok = stories
    result = evaluate_perplexity(model, tok, "tinystories", seq_len=512, bos=True)
    assert result["windows"] == 769
    assert round(result["ppl"], 2) == 5.32
