"""engine.eval.embed without a process group: the slices cover the items once, in order; the gather returns the
caller's array cut to the set (on ranks: tests/distributed/test_eval_hook.py and test_eval_ijb.py, against one
rank)."""
import numpy as np
import pytest

from engine.eval import embed


@pytest.mark.parametrize("num, world", [(10, 1), (10, 3), (5, 2), (2, 3), (0, 2)])
def test_slices_cover_every_item_once_in_order(num, world):
    slices = [embed.rank_slice(num, r, world) for r in range(world)]
    assert [i for start, stop, _ in slices for i in range(start, stop)] == list(range(num))
    assert all(stop - start <= per_rank == -(-num // world) for start, stop, per_rank in slices)


def test_bad_slice_arguments_are_named():
    with pytest.raises(ValueError, match="rank_slice: .* got 3, 2, 2"):
        embed.rank_slice(3, 2, 2)


def test_gather_without_a_group_cuts_the_padding():
    raw = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)  # [views, padded items, E]
    got = embed.gather_slices(raw, 4, device=None, axis=1)
    np.testing.assert_array_equal(got, raw[:, :4])
