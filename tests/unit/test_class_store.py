"""heads.class_store: device comparisons that do not depend on the spelling (cuda vs cuda:0), and the host memory
a pinned (offloaded) table takes under PyTorch's caching host allocator's power-of-two rounding."""
import pytest
import torch

from heads import class_store
from heads.class_store import load_rows, pinned_host_bytes, same_device


def test_same_device_normalises_the_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert same_device(torch.device("cuda"), torch.device("cuda", 0))  # torch.device says they differ
    assert torch.device("cuda") != torch.device("cuda", 0)
    assert same_device(torch.device("cuda", 0), torch.device("cuda"))
    assert not same_device(torch.device("cuda"), torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert same_device(torch.device("cuda"), torch.device("cuda", 1))
    assert same_device(torch.device("cpu"), torch.device("cpu", 0))
    assert not same_device(torch.device("cpu"), torch.device("cuda", 0))


def test_a_table_on_the_compute_device_is_gathered_in_place_however_spelled(monkeypatch):
    """The old `table.device == device` sent a table on cuda:0 with device "cuda" through the host staging path
    (index_select of a device table into a pinned host buffer); here the CPU's "cpu" vs "cpu:0" is that case."""
    table = torch.arange(12.0).view(6, 2).to(torch.bfloat16)
    rows = torch.tensor([4, 1])

    def staged(*args, **kwargs):
        raise AssertionError("a table on the compute device went through the host staging buffer")

    monkeypatch.setattr(class_store, "_host_rows", staged)
    out = load_rows(table, rows, torch.device("cpu", 0))
    assert out.dtype == torch.float32
    assert torch.equal(out, table.float()[rows])


def test_host_rows_are_staged_for_another_device():
    table = torch.arange(12.0).view(6, 2)
    host = class_store._host_rows(table, torch.tensor([5, 0]), pin=False)
    assert torch.equal(host, table[[5, 0]]) and not host.is_pinned()


GB, GiB = 10 ** 9, 2 ** 30


def test_pinned_tables_take_the_next_power_of_two():
    """ATen/core/CachingHostAllocator.h rounds each pinned request up to a power of two (torch 2.11: always)."""
    assert pinned_host_bytes(int(14.8 * GB)) == 16 * GiB  # the 14.8 GB offloaded head of the 2060 recipe
    assert pinned_host_bytes(16 * GiB) == 16 * GiB
    assert pinned_host_bytes(16 * GiB + 1) == 32 * GiB
    assert pinned_host_bytes(3) == 4 and pinned_host_bytes(0) == 0
    # newer torch with pinned_max_round_threshold_mb: exact above the threshold, rounded below it
    assert pinned_host_bytes(int(14.8 * GB), round_threshold=1024 * 2 ** 20) == int(14.8 * GB)
    assert pinned_host_bytes(600 * 2 ** 20, round_threshold=1024 * 2 ** 20) == 1024 * 2 ** 20


@pytest.mark.parametrize("nbytes", [1, 5, 1000, 2 ** 20 + 3, 10 ** 10])
def test_pinned_bytes_is_the_smallest_power_of_two_that_holds_the_request(nbytes):
    got = pinned_host_bytes(nbytes)
    assert got >= nbytes and got & (got - 1) == 0 and got // 2 < nbytes
