"""Partial FC's chunked softmax on 2 spawned ranks equals the unchunked head (loss, embedding and weight
gradients). (One process, offload, storage dtype, sampler, sparse updates: tests/unit/test_pfc_scale.py; the
comparison both run: tests/support/pfc_scale.py.)
"""

import pickle

from engine.runtime.spawn import run_distributed
from tests.support.pfc_scale import CHUNK_CASES, check_chunks, chunk_compare, close


def _dist_chunks():
    import torch.distributed as dist

    return pickle.dumps(chunk_compare(dist.get_world_size(), dist.get_rank()))


def test_chunked_equals_unchunked_two_ranks():
    per_rank = [pickle.loads(r) for r in run_distributed(_dist_chunks, 2, timeout_s=180)]
    for r in per_rank:
        check_chunks(r)
    for case in range(len(CHUNK_CASES)):  # the loss is global: the same on both ranks
        close(per_rank[1][case][2]["loss"], per_rank[0][case][0]["loss"])
