"""engine.runtime.dist without a process group: which device a rank takes (GPU number LOCAL_RANK, unwrapped, and
only under a CUDA backend), how a process started by srun/mpirun without RANK finds its rank, the per-device
settings, and the suite's own pin to the CPU. CUDA is faked (is_available/device_count) where a test needs a
GPU machine: these are the decisions taken before any CUDA call."""
import os

import pytest
import torch

from engine.runtime import dist


@pytest.fixture
def two_gpus(monkeypatch):
    """A process that sees two CUDA devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")


def test_device_is_the_local_rank_th_gpu_unwrapped(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.get_device("nccl") == torch.device("cuda", 1)
    assert dist.get_device() == torch.device("cuda", 1)  # no group: the backend init would pick (nccl)
    # LOCAL_RANK past the visible devices: DeepSpeed would take cuda:2 (invalid), the old modulo cuda:0 (shared)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2 .* 2 CUDA device\(s\) \(CUDA_VISIBLE_DEVICES='0,1'\)"):
        dist.get_device("nccl")
    # one GPU per process through CUDA_VISIBLE_DEVICES, LOCAL_RANK left at the node rank: named, not wrapped
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=3 .*CUDA_VISIBLE_DEVICES='3'.*LOCAL_RANK=0"):
        dist.get_device()


def test_device_follows_the_backend(two_gpus, monkeypatch):
    """gloo moves CPU tensors only: a gloo group trains on the CPU even where GPUs are visible."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert dist.get_device("gloo") == torch.device("cpu")
    assert dist.get_device("cpu:gloo,cuda:nccl") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.get_device("nccl") == torch.device("cpu")  # no CUDA at all
    assert dist.default_backend() == "gloo"


def test_configure_device_sets_cudnn_benchmark_for_cuda(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    dist.configure_device(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False and chosen == []
    dist.configure_device(torch.device("cuda", 1))
    assert torch.backends.cudnn.benchmark is True  # fixed shapes: autotune once, in the first step
    assert chosen == [torch.device("cuda", 1)]


SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
        "SLURM_TASKS_PER_NODE": "4(x2)"}
OMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
PMI = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}
MASTER = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("launcher_env, launcher, rank, world, local, local_size", [
    (SRUN, "srun", "5", "8", "1", "4"),
    (OMPI, "mpirun (Open MPI)", "3", "4", "1", "2"),
    (PMI, "mpirun (MPICH / Intel MPI)", "2", "3", "2", "3"),
])
def test_srun_and_mpirun_without_rank_are_mapped(launcher_env, launcher, rank, world, local, local_size):
    env = {**launcher_env, **MASTER}
    assert dist.resolve_launch_env(env) == launcher
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_SIZE"]) == (rank, world, local,
                                                                                      local_size)
    assert env["MASTER_ADDR"] == "10.0.0.1"  # rank 0's address as given, never replaced by localhost


@pytest.mark.parametrize("launcher_env, rank_var", [(SRUN, "SLURM_PROCID"), (OMPI, "OMPI_COMM_WORLD_RANK"),
                                                    (PMI, "PMI_RANK")])
def test_srun_and_mpirun_without_rank_or_master_are_an_error(launcher_env, rank_var):
    """Never a silent world of one: N such processes would each train alone on the same output."""
    env = dict(launcher_env)
    with pytest.raises(ValueError, match=rf"{rank_var}=\d.* RANK is not set .*MASTER_ADDR / MASTER_PORT"):
        dist.resolve_launch_env(env)
    assert "RANK" not in env


def test_single_process_and_launched_processes():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}  # a one-task srun (or the batch script of one)
    assert dist.resolve_launch_env(env) == "single"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert int(env["MASTER_PORT"]) > 0
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", **SRUN}  # a launcher's RANK wins over srun's
    assert dist.resolve_launch_env(env) == "launcher"
    assert env["RANK"] == "1" and "MASTER_ADDR" not in env


def test_the_suite_is_pinned_to_the_cpu():
    """tests/conftest.py hides the GPUs before anything initialises CUDA, so every tier runs on the CPU (gloo,
    DeepSpeed's CPU accelerator) on a machine with GPUs too; ARCSCALE_TEST_CUDA=1 leaves them visible."""
    if os.environ.get("ARCSCALE_TEST_CUDA") == "1":
        pytest.skip("ARCSCALE_TEST_CUDA=1: GPUs deliberately visible")
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert not torch.cuda.is_available()
    assert dist.get_device() == torch.device("cpu")


def test_a_bad_local_rank_stops_the_job_in_one_line(two_gpus, monkeypatch, capsys):
    """run.py's job: LOCAL_RANK past the visible GPUs is named before anything starts (no traceback)."""
    from engine.config import schema
    from engine.train.build import run_job

    cfg = schema.from_dict({"train_micro_batch_size_per_gpu": 2,
                            "engine": {"model": {"name": "mbf"}, "head": {"num_classes": 10}}})
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.delenv("RANK", raising=False)
    assert run_job(cfg) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[rank 0] error: LOCAL_RANK=5 but this process sees 2 CUDA device(s)")
