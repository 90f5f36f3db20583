"""Every private torch/DeepSpeed API the engine relies on (engine/runtime/compat.py, heads/compat.py), called against the
installed versions. A version bump that renames or changes one fails here, naming the API, not
deep inside a training step or as a silent fallback to a default. (The DeepSpeed engine's own APIs, which
need a process group: tests/distributed/test_compat.py.)
"""
import pytest
import torch

from engine.runtime import compat
from heads import compat as heads_compat

# -- torch --------------------------------------------------------------------------------------------------------

def test_in_backward_tells_recompute_from_forward():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", compat.in_backward()))
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(("backward", compat.in_backward()))
            return g * 2

    x = torch.ones(3, requires_grad=True)
    Probe.apply(x).sum().backward()
    assert seen == [("forward", False), ("backward", True)]


def test_storage_id_is_shared_by_views_only():
    a, b = torch.zeros(4, 4), torch.zeros(4, 4)
    assert compat.storage_id(a) == compat.storage_id(a.t()) == compat.storage_id(a[1:])
    assert compat.storage_id(a) != compat.storage_id(b)


def test_version_counter_counts_in_place_writes():
    w = torch.zeros(3)
    v0 = heads_compat.version_counter(w)
    w.add_(1)
    assert heads_compat.version_counter(w) == v0 + 1


def test_sparse_values_without_coalescing():
    grad = torch.sparse_coo_tensor(torch.tensor([[4, 1, 4]]), torch.ones(3, 2), (9, 2), check_invariants=True)
    assert not grad.is_coalesced() and heads_compat.sparse_values(grad).shape == (3, 2)


def test_all_finite_catches_inf_and_nan():
    from engine.parallel.common import all_finite

    ok = [torch.ones(3), torch.zeros(2, 2), None]
    assert bool(all_finite(ok)) and bool(all_finite([]))
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.ones(5)
        t[3] = bad
        assert not bool(all_finite(ok + [t])), bad
    both = torch.tensor([float("inf"), float("-inf")])  # inf + -inf = nan: still caught
    assert not bool(all_finite([both]))


def test_mark_sorted_sparse_coalesced():
    values = torch.arange(6.0).reshape(3, 2)
    sorted_grad = torch.sparse_coo_tensor(torch.tensor([[1, 4, 7]]), values, (9, 2), check_invariants=True)
    assert not sorted_grad.is_coalesced()
    marked = heads_compat.mark_sorted_sparse_coalesced(sorted_grad)
    assert marked.is_coalesced() and torch.equal(marked.to_dense(), sorted_grad.to_dense())
    assert marked.values().data_ptr() == sorted_grad._values().data_ptr()  # no copy of the [k, E] values
    unsorted = torch.sparse_coo_tensor(torch.tensor([[4, 1, 4]]), values, (9, 2), check_invariants=True)
    fixed = heads_compat.mark_sorted_sparse_coalesced(unsorted)
    assert fixed.is_coalesced() and torch.equal(fixed.to_dense(), unsorted.to_dense())


# -- DeepSpeed ----------------------------------------------------------------------------------------------------

def test_disable_deepspeed_op_marks_the_table():
    import deepspeed

    compat.disable_deepspeed_op("deepspeed_shm_comm")
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


def test_loss_scale_apis_exist_on_deepspeed_classes():
    """fp16 cannot run on these CPUs, so the fp16 optimizers are checked as classes: the attributes
    compat.loss_scale / step_overflowed / loss_scaler_state read must exist where DeepSpeed defines them."""
    import inspect

    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert isinstance(getattr(cls, "loss_scale", None), property), f"{cls.__name__}.loss_scale"
        assert "self.overflow" in inspect.getsource(cls), f"{cls.__name__}.overflow"
        assert "self.loss_scaler" in inspect.getsource(cls), f"{cls.__name__}.loss_scaler"
    assert "self.loss_scale_config" in inspect.getsource(FP16_Optimizer.__init__), "FP16_Optimizer.loss_scale_config"
    kw = dict(scale_window=1000, min_scale=1.0, delayed_shift=2, consecutive_hysteresis=False)
    scaler = DynamicLossScaler(init_scale=2.0 ** 16, **kw)
    state = compat.loss_scaler_state(type("Opt", (), {"loss_scaler": scaler})())
    assert state["cur_scale"] == 2.0 ** 16 and {"cur_iter", "last_overflow_iter"} <= set(state)
    fresh = DynamicLossScaler(init_scale=4.0, **kw)
    assert compat.load_loss_scaler_state(type("Opt", (), {"loss_scaler": fresh})(), state)
    assert fresh.cur_scale == 2.0 ** 16


def test_missing_api_is_named(monkeypatch):
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    with pytest.raises(compat.PrivateAPIError, match=r"torch\._C\._current_graph_task_id"):
        compat.in_backward()


# -- torch 2.11 (the GPU machines' image) beside the pinned 2.13 ---------------------------------------------------

def test_torch_version_parses_local_builds():
    assert compat.torch_version("2.11.0+cu130") == (2, 11)
    assert compat.torch_version("2.13.0+cpu") == (2, 13)
    assert compat.torch_version("2.14.0a0+git1234") == (2, 14)
    assert compat.torch_version() == tuple(int(x) for x in torch.__version__.split(".")[:2])


def test_pinned_round_threshold_only_where_torch_has_the_knob():
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:True,pinned_max_round_threshold_mb:512"}
    assert compat.pinned_round_threshold_bytes(env, version="2.13.0") == 512 * 2 ** 20
    assert compat.pinned_round_threshold_bytes(env, version="2.11.0+cu130") is None  # 2.11 always rounds
    assert compat.pinned_round_threshold_bytes({"PYTORCH_CUDA_ALLOC_CONF": "pinned_max_round_threshold_mb:64"},
                                               version="2.13.0") == 64 * 2 ** 20  # the older variable name
    assert compat.pinned_round_threshold_bytes({}, version="2.13.0") is None
    with pytest.raises(ValueError, match="pinned_max_round_threshold_mb expects a number of MiB, got 'lots'"):
        compat.pinned_round_threshold_bytes({"PYTORCH_ALLOC_CONF": "pinned_max_round_threshold_mb:lots"},
                                            version="2.13.0")


def test_group_timeout_set_in_cpu_and_cuda_builds(monkeypatch):
    """c10d.default_pg_nccl_timeout is None in a CPU build (here) and NCCL's 10-minute default in a CUDA build
    (2.11+cu130 on the GPU machines): both must end up with the run's timeout, the CPU build's None kept."""
    import datetime

    import torch.distributed.distributed_c10d as c10d

    run = datetime.timedelta(seconds=123)
    monkeypatch.setattr(c10d, "default_pg_timeout", datetime.timedelta(minutes=30))
    monkeypatch.setattr(c10d, "default_pg_nccl_timeout", None)
    compat.set_default_group_timeout(run)
    assert c10d.default_pg_timeout == run and c10d.default_pg_nccl_timeout is None
    monkeypatch.setattr(c10d, "default_pg_nccl_timeout", datetime.timedelta(minutes=10))  # a CUDA build
    compat.set_default_group_timeout(run)
    assert c10d.default_pg_timeout == run and c10d.default_pg_nccl_timeout == run
    monkeypatch.delattr(c10d, "default_pg_nccl_timeout")
    with pytest.raises(compat.PrivateAPIError, match="default_pg_nccl_timeout"):
        compat.set_default_group_timeout(run)
