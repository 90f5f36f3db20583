"""PartialFC on 2 gloo ranks against a single-process full-softmax reference written with plain torch ops: full
softmax (sample_rate=1) for ArcFace/CosFace margins and uneven shards, sampled classes, and errors raised on
every rank. (The same reference in one process: tests/unit/test_partial_fc.py; the reference and the checks
both run: tests/support/partial_fc.py.)
"""

import pickle

import torch

from engine.runtime.spawn import run_distributed
from tests.support.partial_fc import (B, CONFIGS, E, assert_close_rel, check_full, make_batch, make_head, reference,
                                     run_step)


def _dist(fn, *args):
    """run_distributed, with results pickled to bytes in the ranks: tensors put on a multiprocessing queue are
    passed as shared-memory file descriptors that die with the rank process that sent them."""
    return [pickle.loads(r) for r in run_distributed(fn, 2, *args, timeout_s=120)]


# -- full softmax (sample_rate=1) -------------------------------------------------------------------------------

def _dist_full(configs):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for num_classes, m2, m3, margin_grad in configs:
        emb, labels = make_batch(world, num_classes, seed=num_classes)
        head = make_head(num_classes, m2=m2, m3=m3, margin_grad=margin_grad)
        out.append(run_step(head, emb, labels, rank, world))
    return pickle.dumps(out)


def test_two_ranks_match_full_softmax_reference():
    per_rank = _dist(_dist_full, CONFIGS)
    for i, cfg in enumerate(CONFIGS):
        check_full([per_rank[r][i] for r in range(2)], 2, *cfg)
    assert [r[1]["num_local"] for r in per_rank] == [6, 5]  # 11 classes: remainder to the first rank


# -- sampling ---------------------------------------------------------------------------------------------------

NUM_CLASSES_S, RATE, B_S = 200, 0.25, 16  # 100 classes per rank, 25 sampled; 16 samples per rank


def _sample_labels(step, world):
    if step == 2:  # 32 distinct classes of rank 0's shard: more positives than num_sample -> positives only
        return torch.randperm(100, generator=torch.Generator().manual_seed(5))[: world * B_S]
    g = torch.Generator().manual_seed(100 + (step % 2))  # steps 0 and 1 get different labels; 3 repeats 1
    return torch.randint(0, NUM_CLASSES_S, (world * B_S,), generator=g)


def _dist_sampled(seeds):
    """Four steps of a sampled head per seed (fresh head each time, same labels and embeddings)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    runs = []
    for seed in seeds:
        head = make_head(NUM_CLASSES_S, RATE, seed=seed)
        out = []
        for step in range(4):
            labels = _sample_labels(step, world)
            emb = torch.randn(labels.numel(), E, generator=torch.Generator().manual_seed(step))
            head.weight.grad = None
            out.append(run_step(head, emb, labels, rank, world, batch=B_S))
        runs.append(dict(steps=out, num_sample=head.num_sample))
    return pickle.dumps(runs)


def test_sampled_two_ranks():
    world = 2
    per_rank, again, other = (list(x) for x in zip(*_dist(_dist_sampled, (7, 7, 8))))
    full = make_head(NUM_CLASSES_S, seed=7).weight.detach()
    for step in range(4):
        labels = _sample_labels(step, world)
        emb = torch.randn(labels.numel(), E, generator=torch.Generator().manual_seed(step))
        columns = []
        for r in range(world):
            res = per_rank[r]["steps"][step]
            start, n = res["class_start"], res["num_local"]
            index = res["index"]
            positives = torch.unique(labels[(labels >= start) & (labels < start + n)] - start)
            assert set(positives.tolist()) <= set(index.tolist())  # positives always sampled
            assert index.numel() == max(per_rank[r]["num_sample"], positives.numel())
            assert torch.equal(index, index.sort()[0]) and index.unique().numel() == index.numel()
            assert torch.equal(index, again[r]["steps"][step]["index"])  # reproducible for a seed
            assert res["sparse"] and res["inputs_unchanged"]
            columns.append(index + start)
        # the loss is the full-softmax reference restricted to the sampled classes
        cols = torch.cat(columns)
        remap = torch.full((NUM_CLASSES_S,), -1, dtype=torch.long)
        remap[cols] = torch.arange(cols.numel())
        ref_loss, ref_emb_grad, ref_w_grad = reference(emb, remap[labels], full[cols])
        dense = torch.zeros(NUM_CLASSES_S, E)
        dense[cols] = ref_w_grad
        for r in range(world):
            res = per_rank[r]["steps"][step]
            assert_close_rel(res["loss"], ref_loss)
            assert_close_rel(res["emb_grad"] / world, ref_emb_grad[r * B_S:(r + 1) * B_S])
            start, n = res["class_start"], res["num_local"]
            assert_close_rel(res["weight_grad"], dense[start:start + n])  # zero outside the sampled rows
    assert per_rank[0]["num_sample"] == 25
    assert per_rank[0]["steps"][2]["index"].numel() == 32  # more positives than num_sample: positives only
    for r in range(world):
        steps = per_rank[r]["steps"]
        # different across steps (steps 1 and 3 have identical labels, still different negatives)
        assert not torch.equal(steps[1]["index"], steps[3]["index"])
        assert not torch.equal(steps[0]["index"], steps[1]["index"])
        assert not torch.equal(other[r]["steps"][0]["index"], steps[0]["index"])  # another seed


# -- errors -----------------------------------------------------------------------------------------------------

def _catch(fn):
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


def _dist_errors():
    import torch.distributed as dist

    rank = dist.get_rank()
    msgs = {}
    emb = torch.randn(B, E)
    ok = torch.arange(B)

    head = make_head(12)
    bad = ok.clone()
    if rank == 1:
        bad[2] = 12
    msgs["label"] = _catch(lambda: head(emb, bad))

    head = make_head(12)
    msgs["ranks"] = _catch(lambda: head(torch.randn(B + rank, E), torch.zeros(B + rank, dtype=torch.long)))

    head = make_head(12)
    first = _catch(lambda: head(emb, ok))
    msgs["steps"] = _catch(lambda: head(emb[:-1], ok[:-1]))
    msgs["first_ok"] = first is None

    head = make_head(12)
    msgs["dim"] = _catch(lambda: head(torch.randn(B, E + rank), ok))

    head = make_head(12)  # still usable after errors: collectives stayed in step
    msgs["after"] = _catch(lambda: head(emb, ok).backward())
    return pickle.dumps(msgs)


def test_errors_raise_on_every_rank():
    per_rank = _dist(_dist_errors)
    for msgs in per_rank:
        assert "12" in msgs["label"] and "[0, 12)" in msgs["label"] and "rank 1" in msgs["label"]
        assert "rank 0: 4" in msgs["ranks"] and "rank 1: 5" in msgs["ranks"]
        assert msgs["first_ok"] and "4" in msgs["steps"] and "3" in msgs["steps"]
        assert "embedding_size" in msgs["dim"] and "9" in msgs["dim"]
        assert msgs["after"] is None
