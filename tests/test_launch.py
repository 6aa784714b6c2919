"""Worker slots: which GPU each launched worker sees, and how the cores are split on the CPU."""

from __future__ import annotations

import pytest

from nas3d.launch import plan_slots


@pytest.mark.parametrize(
    ("parent", "expected"),
    [
        (None, ["1", "1", "3", "3"]),  # no restriction: the machine's numbering
        ("4,5,6,7", ["5", "5", "7", "7"]),  # a Slurm/Kubernetes allocation: index into it
        ("GPU-aaaa, GPU-bbbb, GPU-cccc, GPU-dddd", ["GPU-bbbb", "GPU-bbbb", "GPU-dddd", "GPU-dddd"]),
    ],
    ids=["unrestricted", "ordinals", "uuids"],
)
def test_each_worker_sees_the_gpu_this_process_numbers_so(
    monkeypatch: pytest.MonkeyPatch, parent: str | None, expected: list[str]
) -> None:
    if parent is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    slots = plan_slots(gpus=[1, 3], workers_per_gpu=2)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == expected
    assert [s.device for s in slots] == ["cuda"] * 4 and [s.index for s in slots] == [0, 1, 2, 3]


def test_cpu_workers_see_no_gpu_and_split_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    slots = plan_slots(gpus=None, cpu_workers=4)
    assert {s.env["CUDA_VISIBLE_DEVICES"] for s in slots} == {""}
    assert {s.env["OMP_NUM_THREADS"] for s in slots} == {"2"}
