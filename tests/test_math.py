"""Pooling, losses and retrieval metrics on hand-made tensors and rankings."""

import math

import pytest
import torch

from train.losses import contrastive_loss, matryoshka_loss
from train.metrics import mrr_at_k, ndcg_at_k, recall_at_k, retrieval_metrics
from train.pooling import matryoshka, mean_pool, normalize


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # [1, 3, 2], last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_mean_pool_all_padding_is_finite():
    out = mean_pool(torch.ones(1, 2, 3), torch.zeros(1, 2, dtype=torch.long))
    assert torch.isfinite(out).all()


def test_matryoshka_slices_then_renormalises():
    x = torch.tensor([[3.0, 4.0, 12.0]])
    assert torch.allclose(matryoshka(x, 2), torch.tensor([[0.6, 0.8]]))
    assert torch.allclose(normalize(x).norm(dim=-1), torch.ones(1))
    with pytest.raises(ValueError, match="exceeds the embedding size 3"):
        matryoshka(x, 4)


def test_loss_is_log_one_plus_n_when_all_scores_equal():
    q = normalize(torch.ones(4, 8))
    pos = normalize(torch.ones(4, 8))
    neg = normalize(torch.ones(4, 3, 8))
    assert contrastive_loss(q, pos, neg, temperature=0.02).item() == pytest.approx(math.log(4), abs=1e-5)


def test_loss_near_zero_when_positive_dominates_and_large_when_reversed():
    eye = torch.eye(4)
    q, pos = eye, eye
    neg = -eye.unsqueeze(1)  # [4, 1, 4], opposite direction
    good = contrastive_loss(q, pos, neg, temperature=0.05)
    bad = contrastive_loss(q, neg[:, 0], pos.unsqueeze(1), temperature=0.05)
    assert good.item() < 1e-6 and bad.item() > 30


def test_in_batch_negatives_add_other_queries_documents():
    q = normalize(torch.ones(3, 4))
    # equal scores everywhere: 3 positives + 3x2 negatives = 9 candidates
    loss = contrastive_loss(q, q.clone(), q.unsqueeze(1).repeat(1, 2, 1), 0.02, in_batch_negatives=True)
    assert loss.item() == pytest.approx(math.log(9), abs=1e-5)


def test_matryoshka_loss_weights_sizes():
    torch.manual_seed(0)
    q, pos, neg = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2, 8)
    small = contrastive_loss(matryoshka(q, 4), matryoshka(pos, 4), matryoshka(neg, 4), 0.05)
    full = contrastive_loss(normalize(q), normalize(pos), normalize(neg), 0.05)
    both = matryoshka_loss(q, pos, neg, [4, 8], 0.05, weights=[3.0, 1.0])
    assert both.item() == pytest.approx((3 * small.item() + full.item()) / 4, rel=1e-5)


def test_metrics_by_hand():
    rel = {"d2": 1}
    ranked = ["d1", "d2", "d3"]
    assert ndcg_at_k(ranked, rel, 10) == pytest.approx(1 / math.log2(3))
    assert recall_at_k(ranked, rel, 1) == 0.0 and recall_at_k(ranked, rel, 5) == 1.0
    assert mrr_at_k(ranked, rel, 10) == 0.5
    graded = {"a": 2, "b": 1}
    assert ndcg_at_k(["b", "a"], graded, 10) == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))


def test_retrieval_metrics_average_over_judged_queries():
    out = retrieval_metrics({"q1": ["d1"], "q2": ["x", "d2"]}, {"q1": {"d1": 1}, "q2": {"d2": 1}})
    assert out["recall@1"] == 0.5 and out["mrr@10"] == 0.75 and out["recall@10"] == 1.0


def test_a_querys_own_positive_met_again_in_the_batch_is_not_its_negative():
    """Query 0's positive text is also query 1's hard negative: with keys, that column leaves query 0's
    softmax (the loss equals the loss without the column), and query 1's row keeps it as a negative."""
    from train.losses import text_keys

    torch.manual_seed(0)
    pos, neg = normalize(torch.randn(2, 8)), normalize(torch.randn(2, 1, 8))
    q = normalize(pos + 0.3 * torch.randn(2, 8))  # each query near its positive: the duplicate weighs a lot
    neg[1, 0] = pos[0]
    pos_keys = text_keys(["doc a", "doc b"])
    neg_keys = text_keys(["doc c", "doc a"]).reshape(2, 1)
    got = contrastive_loss(q, pos, neg, 0.05, True, pos_keys, neg_keys)
    logits = q @ torch.cat([pos, neg[:, 0]]).T / 0.05  # [2, 4]: pos a, pos b, neg c, neg a
    want = (torch.logsumexp(logits[0, :3], 0) - logits[0, 0] + torch.logsumexp(logits[1], 0) - logits[1, 1]) / 2
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    assert contrastive_loss(q, pos, neg, 0.05, True).item() != pytest.approx(want.item(), abs=1e-3)
    # without in-batch negatives: a hard negative that repeats the query's own positive is dropped too
    neg_keys = text_keys(["doc a", "doc d"]).reshape(2, 1)
    neg[0, 0] = pos[0]
    got = contrastive_loss(q, pos, neg, 0.05, False, pos_keys, neg_keys)
    s1 = torch.stack([(q[1] * pos[1]).sum(), (q[1] * neg[1, 0]).sum()]) / 0.05
    assert got.item() == pytest.approx(((torch.logsumexp(s1, 0) - s1[0]) / 2).item(), abs=1e-5)
