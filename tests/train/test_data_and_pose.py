"""Packing, the per-rank data schedule, and PoSE position ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ropekit import RopekitError
from ropekit.train.data import mix_passkey, pack_windows, passkey_windows, window_indices
from ropekit.train.pose import pose_position_ids, pose_rng, pose_sample


def test_packing_marks_document_boundaries_with_eos():
    windows = pack_windows([np.array([5, 6, 7]), np.array([8, 9])], 3, eos_id=2)
    assert windows.tolist() == [[5, 6, 7], [2, 8, 9]]  # stream 5 6 7 EOS 8 9 EOS → tail dropped
    with pytest.raises(RopekitError, match="fewer than one window"):
        pack_windows([np.array([1, 2])], 8, eos_id=2)


def schedule(step, *, world, accumulation, micro_batch=1, n=50):
    return [
        window_indices(
            step, m, r, num_windows=n, micro_batch=micro_batch, world=world, accumulation=accumulation, seed=7
        )
        for m in range(accumulation)
        for r in range(world)
    ]


def test_same_global_batch_sees_the_same_windows_whatever_the_process_count():
    for step in range(6):
        one = sorted(i for part in schedule(step, world=1, accumulation=4) for i in part)
        two = sorted(i for part in schedule(step, world=2, accumulation=2) for i in part)
        four = sorted(i for part in schedule(step, world=4, accumulation=1) for i in part)
        assert one == two == four and len(set(one)) == 4


def test_ranks_get_disjoint_windows_and_an_epoch_covers_everything():
    seen = [i for step in range(10) for part in schedule(step, world=2, accumulation=1, micro_batch=5) for i in part]
    assert sorted(seen[:50]) == list(range(50))  # 10 steps × global batch 10 = 2 epochs of 50; first epoch complete
    step0 = schedule(0, world=2, accumulation=1, micro_batch=5)
    assert not set(step0[0]) & set(step0[1])


@pytest.mark.parametrize("train,target,chunks", [(512, 2048, 2), (256, 4096, 4), (100, 101, 2), (64, 64, 3)])
def test_pose_position_ids(train, target, chunks):
    for seed in range(20):
        ids = pose_position_ids(train, target, pose_rng(seed, 3, 1), chunks=chunks)
        assert ids.shape == (train,) and ids.dtype == torch.int64
        steps = ids[1:] - ids[:-1]
        assert (steps >= 1).all() and int(ids[0]) == 0 and int(ids[-1]) < target
        assert int((steps > 1).sum()) <= chunks - 1  # skips only at chunk boundaries: chunks keep their order


def test_pose_skips_reach_far_positions_and_are_deterministic():
    tops = [int(pose_position_ids(512, 8192, pose_rng(s, 0, 0))[-1]) for s in range(50)]
    assert max(tops) > 4096
    assert torch.equal(pose_position_ids(512, 8192, pose_rng(1, 2, 3)), pose_position_ids(512, 8192, pose_rng(1, 2, 3)))
    with pytest.raises(RopekitError, match="exceeds the target"):
        pose_position_ids(600, 512, pose_rng(0, 0, 0))


def _histogram(values, support) -> np.ndarray:
    counts = np.array([sum(1 for v in values if v == k) for k in support], dtype=float)
    return counts / len(values)


def _close(observed: np.ndarray, expected: np.ndarray, draws: int) -> bool:
    """Every bin within 5 binomial standard deviations of the formula."""
    sigma = np.sqrt(expected * (1 - expected) / draws)
    return bool(np.all(np.abs(observed - expected) <= 5 * sigma + 1e-12))


def test_pose_first_chunk_and_skip_distributions_follow_the_formulas():
    """Seeded histograms: l_0 ~ U{1 … ⌊(L_c+1)/2⌋}; u_1 ~ U{0 … L'−L_c}; u_2 | u_1 ~ U{u_1 … L'−L_c}."""
    train, target, draws = 9, 15, 12000
    rng = np.random.default_rng(7)
    samples = [pose_sample(train, target, rng, chunks=3) for _ in range(draws)]
    room = target - train  # 6
    first = _histogram([s.chunk_lengths[0] for s in samples], range(1, 6))  # ⌊(9+1)/2⌋ = 5
    assert _close(first, np.full(5, 1 / 5), draws)
    u1 = _histogram([s.position_skips[1] for s in samples], range(room + 1))
    assert _close(u1, np.full(room + 1, 1 / (room + 1)), draws)
    # P(u_2 = k) = Σ_{j ≤ k} P(u_1 = j) · 1/(room − j + 1)
    u2_formula = np.array([sum(1 / (room + 1) / (room - j + 1) for j in range(k + 1)) for k in range(room + 1)])
    u2 = _histogram([s.position_skips[2] for s in samples], range(room + 1))
    assert _close(u2, u2_formula, draws)
    assert all(int(s.position_ids[-1]) < target and s.position_skips[2] >= s.position_skips[1] for s in samples)


def test_pose_two_chunks_match_the_official_draw_and_text_skips():
    """Two chunks as train_pose.py: r1 ~ U{1..⌊(L_c+1)/2⌋}, positions of chunk 2 shifted by U{0..L'−L_c},
    text of chunk 2 read v ~ U{0..L_x−L_c} tokens later."""
    train, target, text_skip, draws = 8, 20, 4, 10000
    rng = np.random.default_rng(11)
    samples = [pose_sample(train, target, rng, chunks=2, text_skip=text_skip) for _ in range(draws)]
    assert _close(_histogram([s.chunk_lengths[0] for s in samples], range(1, 5)), np.full(4, 1 / 4), draws)
    assert _close(_histogram([s.position_skips[1] for s in samples], range(13)), np.full(13, 1 / 13), draws)
    assert _close(_histogram([s.text_skips[1] for s in samples], range(5)), np.full(5, 1 / 5), draws)
    for s in samples[:200]:
        r1, u, v = s.chunk_lengths[0], s.position_skips[1], s.text_skips[1]
        assert s.position_ids.tolist() == list(range(r1)) + list(range(r1 + u, train + u))
        assert s.token_index.tolist() == list(range(r1)) + list(range(r1 + v, train + v))
    with pytest.raises(RopekitError, match="chunks must be in"):
        pose_sample(8, 20, rng, chunks=6)


# ---- the passkey mix -----------------------------------------------------------------------------


def test_passkey_windows_hold_a_needle_and_end_with_its_answer(llama_tokenizer):
    import re

    eos = llama_tokenizer.eos_token_id
    windows = passkey_windows(llama_tokenizer, 6, 256, seed=3, eos_id=eos)
    assert windows.shape == (6, 256) and windows.dtype == np.int64
    depths = []
    for row in windows.tolist():
        end = len(row) - next(i for i, t in enumerate(reversed(row)) if t != eos)  # EOS padding at the end
        assert 0 < 256 - end <= 32  # the longest prompt that fits, then at least one EOS
        text = llama_tokenizer.decode(row[:end], skip_special_tokens=True)
        needles = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", text)
        assert len(needles) == 1 and needles[0][0] == needles[0][1]
        key = needles[0][0]
        assert 1 <= int(key) <= 50000
        assert re.search(r"What is the pass key\? The pass key is (\d+)$", text).group(1) == key  # the answer
        depths.append(text.index("The pass key is") / len(text))
    assert len({round(d, 2) for d in depths}) > 3  # needles at different depths
    again = passkey_windows(llama_tokenizer, 6, 256, seed=3, eos_id=eos)
    other = passkey_windows(llama_tokenizer, 6, 256, seed=4, eos_id=eos)
    assert np.array_equal(windows, again) and not np.array_equal(windows, other)  # seeded


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_passkey_mix_makes_its_share_of_the_windows_training_sees(llama_tokenizer, share):
    text = np.arange(3 * 90, dtype=np.int64).reshape(90, 3) + 1000  # stand-in text windows
    text = np.concatenate([text, np.zeros((90, 253), dtype=np.int64)], axis=1)  # width 256
    mixed = mix_passkey(text, share, llama_tokenizer, seed=0, eos_id=llama_tokenizer.eos_token_id)
    assert np.array_equal(mixed[:90], text)
    passkeys = len(mixed) - 90
    assert passkeys / len(mixed) == pytest.approx(share, abs=0.01)
    seen = [i for step in range(len(mixed)) for i in schedule_of(step, len(mixed))]
    assert sum(i >= 90 for i in seen[: len(mixed)]) == passkeys  # one epoch visits each window once
    assert mix_passkey(text, 0.0, llama_tokenizer, seed=0, eos_id=2) is text
    for bad in (1.0, -0.1):
        with pytest.raises(RopekitError, match="passkey-mix"):
            mix_passkey(text, bad, llama_tokenizer, seed=0, eos_id=2)
    with pytest.raises(RopekitError, match="does not fit in a training window of 32 tokens"):
        mix_passkey(text[:, :32], share, llama_tokenizer, seed=0, eos_id=2)


def schedule_of(step, n):
    return window_indices(step, 0, 0, num_windows=n, micro_batch=1, world=1, accumulation=1, seed=5)
