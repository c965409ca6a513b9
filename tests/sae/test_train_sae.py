"""scripts/train_sae.py's word anchoring: a word feature's decoder row may adapt, but not leave its word."""

import torch

from scripts.train_sae import keep_in_cone


def test_rows_outside_the_cone_turn_to_its_edge_keeping_norm_and_side() -> None:
    g = torch.Generator().manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    w = torch.randn(10, 16, generator=g) * 3
    w[0] = 2.0 * anchors[0] + 0.1 * torch.randn(16, generator=g)  # already inside: left alone
    before = w.clone()
    keep_in_cone(w, anchors, 0.8)
    cos = torch.nn.functional.cosine_similarity(w[:6], anchors, dim=-1)
    assert torch.all(cos >= 0.8 - 1e-5), cos
    torch.testing.assert_close(w[0], before[0])
    torch.testing.assert_close(w[6:], before[6:])  # rows without an anchor are free
    torch.testing.assert_close(w.norm(dim=-1), before.norm(dim=-1))
    moved = cos[1:] < 0.8 + 1e-4
    assert moved.all()  # random rows start far outside a 0.8 cone and land on its edge
    for i in range(1, 6):
        # still leaning the way it did: its part off the anchor points the same way as before
        off_before = before[i] - (before[i] @ anchors[i]) * anchors[i]
        off_after = w[i] - (w[i] @ anchors[i]) * anchors[i]
        assert torch.nn.functional.cosine_similarity(off_before, off_after, dim=0) > 0.999
    keep_in_cone(w, anchors, 1.0)  # cosine 1 is the word's direction itself
    torch.testing.assert_close(torch.nn.functional.normalize(w[:6], dim=-1), anchors)
