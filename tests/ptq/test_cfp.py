"""Coarse-to-fine preprocessing: detection on constructed outliers, exact folding."""

import pytest
import torch

from cbq_ptq.cfp import (
    block_factors,
    channel_factors,
    detect_outliers,
    fold_block,
    input_maxima,
    o_input_to_kv,
    truncate_weights,
)
from cbq_ptq.models import SHARED_MODELS, arch_spec, blocks, load_model
from tests.conftest import need_shared


def test_detects_constructed_outliers():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(256, generator=g) + 0.5  # normal values in [0.5, 1.5)
    v[[3, 77, 200]] = torch.tensor([40.0, 25.0, 30.0])
    out = detect_outliers(v)
    assert out.mask.nonzero().flatten().tolist() == [3, 77, 200]
    assert float(out.threshold) == float(v[~out.mask].max())


def test_fine_stage_keeps_a_mild_candidate_normal():
    # 8.0 and 9.0 are far out; 2.6 passes the coarse IQR bound but sits near the normal set:
    # the fine stage splits after the two big values.
    v = torch.cat([torch.linspace(1.0, 2.0, 100), torch.tensor([2.6, 8.0, 9.0])])
    out = detect_outliers(v)
    assert bool((v[out.mask] >= 8.0).all()) and int(out.mask.sum()) == 2


def test_no_outliers_in_uniform_rows():
    v = torch.stack([torch.linspace(0.0, 1.0, 64), torch.full((64,), 3.0)])
    out = detect_outliers(v)
    assert not bool(out.mask.any())
    assert torch.isinf(out.threshold).all()


def test_channel_factors_and_truncation():
    m = torch.ones(64)
    m[5] = 50.0
    f = channel_factors(m, beta=0.7)
    assert f[5] == pytest.approx(50.0**0.7, rel=1e-6) and float(f[torch.arange(64) != 5].max()) == 1
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    w[2, 9] = -5.0
    clipped, count = truncate_weights(w)
    assert count >= 1
    assert float(clipped[2, 9]) < 0 and abs(float(clipped[2, 9])) <= float(w[2].abs().sort()[0][-2])
    changed = clipped != w
    assert int(changed.sum()) == count  # only the detected outliers move
    assert bool((clipped.abs() <= w.abs()).all())


def test_o_factors_are_shared_by_the_query_heads_of_a_group():
    stat = torch.arange(16, dtype=torch.float32)  # 4 query heads x 4 dims, 2 kv heads
    kv = o_input_to_kv(stat, n_heads=4, n_kv_heads=2)
    assert kv.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


@pytest.fixture(scope="module")
def stories():
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    return load_model("stories260K")


def test_folding_is_an_identity_of_the_fp32_model(stories):
    """Factors from real statistics (plus a forced large factor in every group), folded into
    every block: the fp32 logits do not change beyond rounding."""
    model, _ = stories
    model = __import__("copy").deepcopy(model)
    spec = arch_spec(model)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    for block in blocks(model):
        stats = input_maxima(block, spec.linears, lambda: model(ids))
        factors = block_factors(stats, spec, cfg.num_attention_heads, cfg.num_key_value_heads)
        for key in factors:
            factors[key] = factors[key].clone()
            factors[key][1] = 7.5  # make sure every path is exercised with a non-trivial factor
        fold_block(block, spec, factors, cfg.num_attention_heads, cfg.num_key_value_heads)
    after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
