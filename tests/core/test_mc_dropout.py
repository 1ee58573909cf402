"""MC dropout and embeddings in score_batch: BALD math by hand, the counter-hash masks, cached head
passes against naive full forwards with the same masks, and the embedding against the pooled features."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xal_engine.core.models import DropoutLinear, build_model
from xal_engine.core.scoring import McDropout, _mix32, dropout_keep, mc_head_probs, score_batch
from xal_engine.core.uncertainty import bald, mc_entropy, variation_ratio
from xal_engine.errors import XalError


def _h(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_bald_mc_entropy_and_variation_ratio_hand_case() -> None:
    # T = 3 passes, B = 3 images, K = 3 classes
    probs = torch.tensor([
        [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.8, 0.1, 0.1]],  # pass 1
        [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.1, 0.8, 0.1]],  # pass 2
        [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.8, 0.1, 0.1]],  # pass 3
    ])
    # image 0: confident passes that disagree; mean (2/3, 1/3, 0), every pass entropy 0
    # image 1: the same uncertain pass thrice: all entropy is aleatoric, BALD 0
    # image 2: mean (17/30, 1/3, 1/10); each pass H(.8, .1, .1)
    h_mean = [_h(2 / 3, 1 / 3), _h(0.5, 0.5), _h(17 / 30, 1 / 3, 1 / 10)]
    h_pass = [0.0, _h(0.5, 0.5), _h(0.8, 0.1, 0.1)]
    assert mc_entropy(probs).tolist() == pytest.approx(h_mean, abs=1e-6)
    assert bald(probs).tolist() == pytest.approx([a - b for a, b in zip(h_mean, h_pass)], abs=1e-6)
    assert bald(probs)[0].item() == pytest.approx(math.log(3) - (2 / 3) * math.log(2), abs=1e-6)
    assert bald(probs)[1].item() == 0.0  # clamped at 0, not -1e-8
    # argmaxes: image 0 votes (0, 1, 0) -> 1 - 2/3; image 1 ties go to class 0 every pass -> 0; image 2 (0, 1, 0)
    assert variation_ratio(probs).tolist() == pytest.approx([1 / 3, 0.0, 1 / 3], abs=1e-7)
    # two passes voting two classes: the most a T = 2 ratio can be, 1 - 1/T
    two = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]]])
    assert variation_ratio(two).item() == 0.5 and bald(two).item() == pytest.approx(
        _h(0.55, 0.45) - (_h(0.9, 0.1) + _h(0.2, 0.8)) / 2, abs=1e-6)
    with pytest.raises(XalError, match=r"\(T, B, K\)"):
        bald(torch.rand(4, 3))


def _lowbias32(x: int) -> int:
    """The reference hash in Python integers (unbounded: no overflow to worry about)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_the_int64_hash_equals_32_bit_arithmetic_over_the_whole_range() -> None:
    values = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFE, 0xFFFFFFFF]
    got = _mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_lowbias32(v) for v in values]
    assert _lowbias32(1) != 1 and len(set(got)) == len(values)  # a bijection: distinct in, distinct out


def test_masks_depend_only_on_seed_pool_index_pass_and_feature() -> None:
    index = torch.arange(100, 164)  # pool positions 100..163
    keep = dropout_keep(3, index, samples=8, dim=512, p=0.3)  # (T, B, D)
    assert keep.shape == (8, 64, 512) and keep.dtype == torch.bool
    assert keep.float().mean().item() == pytest.approx(0.7, abs=0.01)  # 262144 draws: sd 0.0009
    # the same images in another batch (order, neighbours) get the same masks
    part = dropout_keep(3, torch.tensor([130, 101, 5]), samples=8, dim=512, p=0.3)
    assert torch.equal(part[:, 0], keep[:, 30]) and torch.equal(part[:, 1], keep[:, 1])
    # passes and images differ from each other; another seed gives other masks; a huge index works
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    assert (dropout_keep(4, index, 8, 512, 0.3) != keep).float().mean().item() == pytest.approx(0.42, abs=0.02)
    big = dropout_keep(3, torch.tensor([2 ** 40 + 100]), 8, 512, 0.3)
    assert not torch.equal(big[:, 0], keep[:, 0])  # the high 32 bits of the index count too


def _features(model: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


class _InjectedMask(nn.Module):
    """Dropout with a given mask: x * m / (1 - p), as nn.Dropout applies its own random one."""

    def __init__(self, mask: torch.Tensor, p: float) -> None:
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask / (1 - self.p)


def test_cached_head_passes_equal_naive_full_forwards_with_the_same_masks() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1, head_dropout=0.4).eval()
    assert isinstance(model.fc, DropoutLinear)
    x = torch.rand(4, 1, 32, 32)
    index = torch.tensor([10, 11, 12, 40])
    mc = McDropout(samples=6, p=0.4, seed=7)
    keep = dropout_keep(mc.seed, index, mc.samples, 512, mc.p).float()  # (T, B, D)
    naive = []
    own = model.fc.dropout
    for t in range(mc.samples):  # the whole model, trunk included, once per pass
        model.fc.dropout = _InjectedMask(keep[t], mc.p)
        with torch.no_grad():
            naive.append(torch.softmax(model(x), dim=1))
    model.fc.dropout = own
    naive_probs = torch.stack(naive)  # (T, B, K)
    cached = mc_head_probs(_features(model, model.fc, x), model.fc, mc, index)
    torch.testing.assert_close(cached, naive_probs, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(naive_probs[0], naive_probs[1])  # the passes do differ
    rois = torch.zeros(4, 32, 32, dtype=torch.bool)
    rois[:, 4:20, 4:20] = True
    got = score_batch(model, "layer1", x, rois=rois, head="fc", mc=mc, index=index)
    for name, fn in (("bald", bald), ("mc_entropy", mc_entropy), ("variation_ratio", variation_ratio)):
        torch.testing.assert_close(got[name], fn(naive_probs), atol=1e-6, rtol=0, msg=name)
    # every other field is the deterministic pass's, bit for bit
    plain = score_batch(model, "layer1", x, rois=rois)
    for name, value in plain.items():
        assert torch.equal(got[name].nan_to_num(-9), value.nan_to_num(-9)), name
    assert "embedding" not in got and "bald" not in plain


@pytest.mark.parametrize("arch, head", [("resnet18", "fc"), ("densenet121", "classifier"),
                                        ("efficientnet_b0", "classifier.1")])
def test_the_embedding_is_the_pooled_penultimate_feature(arch: str, head: str) -> None:
    torch.manual_seed(1)
    model = build_model(arch, 3, 1).eval()
    x = torch.rand(3, 1, 64, 64)
    # torchvision's own pooling, read off the module that pools (resnet/efficientnet: avgpool) or
    # recomputed (densenet: relu, then adaptive average pooling, in its forward)
    if arch == "densenet121":
        with torch.no_grad():
            want = nn.functional.adaptive_avg_pool2d(nn.functional.relu(model.features(x)), 1).flatten(1)
    else:
        seen: list[torch.Tensor] = []
        handle = model.avgpool.register_forward_hook(lambda m, i, o: seen.append(o.detach().flatten(1)))
        with torch.no_grad():
            model(x)
        handle.remove()
        want = seen[0]
    layer = {"resnet18": "layer2", "densenet121": "features.denseblock2", "efficientnet_b0": "features.4"}[arch]
    got = score_batch(model, layer, x, head=head, return_embedding=True)
    assert got.embedding.shape == want.shape == (3, model.get_submodule(head).in_features)
    torch.testing.assert_close(got.embedding, want, atol=1e-5, rtol=1e-5)
    assert "bald" not in got


def test_mc_needs_a_head_an_index_and_a_valid_setting() -> None:
    model = build_model("resnet18", 3, 1).eval()
    x = torch.rand(2, 1, 32, 32)
    mc = McDropout(samples=2, p=0.5)
    with pytest.raises(XalError, match="head layer"):
        score_batch(model, "layer1", x, mc=mc, index=torch.arange(2))
    with pytest.raises(XalError, match="pool positions"):
        score_batch(model, "layer1", x, head="fc", mc=mc)
    with pytest.raises(XalError, match=r"index must have shape \(2,\)"):
        score_batch(model, "layer1", x, head="fc", mc=mc, index=torch.arange(3))
    with pytest.raises(XalError, match="--mc-samples must be at least 2"):
        McDropout(samples=1, p=0.5)
    with pytest.raises(XalError, match=r"\(0, 1\)"):
        McDropout(samples=4, p=0.0)
