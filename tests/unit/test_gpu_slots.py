"""A local GPU workstation: each training job gets its own GPUs (dpscale.workflow.GpuSlots),
training.devices of them."""

from __future__ import annotations

import threading
import time

import pytest

from dpscale import workflow


def test_concurrent_jobs_get_distinct_gpus_and_a_third_waits_for_a_free_one():
    slots = workflow.GpuSlots(visible="")
    first, second = slots.hold(2), slots.hold(2)
    got = [first.__enter__(), second.__enter__()]
    assert sorted(got) == [["0"], ["1"]]
    third: list[str] = []
    waiter = threading.Thread(target=lambda: third.append(slots.hold(2).__enter__()))
    waiter.start()
    time.sleep(0.2)
    assert not third, "no GPU is free: the third job must wait"
    second.__exit__(None, None, None)
    waiter.join(timeout=5)
    assert third == [got[1]], "it gets the GPU just released"


def test_the_gpus_are_those_visible_to_snakemake():
    slots = workflow.GpuSlots(visible="2,5")
    with slots.hold(2) as a, slots.hold(2) as b:
        assert {*a, *b} == {"2", "5"}
    too_many = workflow.GpuSlots(visible="2,5").hold(3)
    with pytest.raises(workflow.StepFailed, match="gpu=3 but CUDA_VISIBLE_DEVICES lists 2"):
        too_many.__enter__()


def test_a_multi_gpu_job_gets_its_devices_together_and_waits_for_all_of_them():
    slots = workflow.GpuSlots(visible="0,1,2")
    one = slots.hold(3)
    assert one.__enter__() == ["0"]
    with slots.hold(3, 2) as pair:
        assert pair == ["1", "2"]
    two: list[list[str]] = []
    with slots.hold(3, 2) as pair:  # held: only "0"'s holder and this pair's GPUs are out
        waiter = threading.Thread(target=lambda: two.append(slots.hold(3, 2).__enter__()))
        waiter.start()
        time.sleep(0.2)
        assert not two, "one GPU is free: a job of two must wait"
    waiter.join(timeout=5)
    assert sorted(two[0]) == sorted(pair)
    with pytest.raises(workflow.StepFailed, match="asks for 4 GPUs, --resources gpu=3"):
        slots.hold(3, 4).__enter__()


def test_gpu_env_is_empty_without_a_gpu_or_inside_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with workflow.gpu_env(0, 4) as env:
        assert env == {}
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # SLURM has set CUDA_VISIBLE_DEVICES itself
    with workflow.gpu_env(1, 4) as env:
        assert env == {}


def test_run_step_gives_the_step_its_gpu_and_logs_it(tmp_path, monkeypatch):
    (tmp_path / "show_gpu.py").write_text(
        "import os\nprint('step sees', os.environ.get('CUDA_VISIBLE_DEVICES'))\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(workflow, "GPUS", workflow.GpuSlots(visible="4,7"))
    logs = [tmp_path / f"step{i}.log" for i in range(2)]
    with workflow.GPUS.hold(2):  # another job holds the first GPU
        workflow.run_step("show_gpu", logs[0], gpus=1, gpu_total=2)
    workflow.run_step("show_gpu", logs[1])  # no GPU asked: the variable is left alone
    lines = logs[0].read_text().splitlines()
    assert "+ CUDA_VISIBLE_DEVICES=7" in lines and "step sees 7" in lines
    assert "CUDA_VISIBLE_DEVICES=" not in logs[1].read_text().split("\n", 1)[1]


def test_no_gpus_declared_means_no_assignment(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with workflow.gpu_env(1, 0) as env:  # the default profile's gpu=0: nothing to hand out
        assert env == {}
