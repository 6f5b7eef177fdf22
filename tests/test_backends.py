"""Where trials run on this machine: one GPU per worker when there are GPUs."""

from __future__ import annotations

import pytest

from tuner.backends.local import assign_gpus, visible_gpus


def test_each_worker_gets_its_own_gpu_and_extra_jobs_share() -> None:
    assert assign_gpus(2, []) == [None, None]
    assert assign_gpus(2, ["0", "1", "2", "3"]) == ["0", "1"]
    assert assign_gpus(3, ["4", "6"]) == ["4", "6", "4"]


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_without_a_gpu_driver_there_is_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """No NVIDIA or AMD kernel driver: no GPU, learnt without importing torch in the driver."""
    from tuner.backends import local

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(local, "GPU_DRIVERS", ("/nonexistent/nvidia",))
    assert visible_gpus() == []
