"""The vectorised angle histogram equals the authors' literal double loop, count for count."""

from __future__ import annotations

import pytest
import torch

from ropekit import RopeSpec
from ropekit.plan.analysis.angles import EPSILON, angle_counts, angle_counts_literal, angle_distribution


@pytest.mark.parametrize(
    "head_dim,base,length,scale,bins",
    [
        pytest.param(16, 10000.0, 512, 4, 360, marks=pytest.mark.slow),
        pytest.param(8, 10000.0, 700, 3, 360, marks=pytest.mark.slow),
        (12, 500.0, 333, 2.5, 97),
    ],
)
def test_vectorised_counts_equal_literal_double_loop(head_dim, base, length, scale, bins):
    spec = RopeSpec(head_dim=head_dim, base=base, context_length=length)
    target = int(length * scale)
    for inv_freq, n in [(spec.inv_freq(), length), (spec.inv_freq(), target), (spec.inv_freq() / scale, target)]:
        fast = angle_counts(inv_freq, n, bins, chunk=97)  # a chunk that does not divide n
        slow = angle_counts_literal(inv_freq, n, bins)
        assert torch.equal(fast, slow)
        assert fast.sum(dim=1).tolist() == [n] * spec.num_pairs


def test_distribution_starts_every_bin_at_epsilon_and_divides_by_n():
    counts = torch.tensor([[3, 0, 1]])
    p = angle_distribution(counts, 4)
    expected = [(3 + EPSILON) / 4, EPSILON / 4, (1 + EPSILON) / 4]
    assert p[0].tolist() == pytest.approx(expected, rel=1e-15)
