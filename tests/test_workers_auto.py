"""`--workers auto` (the default) fits the host: one process without an accelerator on few cores, else the split."""

from __future__ import annotations

import logging
import os
import sys
import types

import pytest

from service import __main__ as cli


@pytest.fixture
def cores(monkeypatch):
    def set_cores(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))

    monkeypatch.delenv("RA_SIMULATED_DEVICE_IMG_S", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return set_cores


def test_few_cores_and_no_accelerator_is_one_process(cores, tmp_path):
    cores(2)
    count, why = cli.auto_workers(tmp_path)
    assert count == 1
    assert "2 cores and no accelerator" in why


def test_enough_cores_or_a_device_is_the_split_with_a_core_left_to_the_engine(cores, tmp_path, monkeypatch):
    cores(cli.SPLIT_MIN_CORES + 4)
    assert cli.auto_workers(tmp_path)[0] == cli.SPLIT_MIN_CORES + 3
    cores(2)
    (tmp_path / "nvidia0").touch()
    count, why = cli.auto_workers(tmp_path)
    assert count == 2 and "NVIDIA GPU" in why
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the GPU is hidden from this process
    assert cli.auto_workers(tmp_path)[0] == 1
    monkeypatch.setenv("RA_SIMULATED_DEVICE_IMG_S", "50000")
    assert cli.auto_workers(tmp_path) == (
        2,
        "2 front ends and an engine process: a simulated device (RA_SIMULATED_DEVICE_IMG_S), 2 cores",
    )


def test_the_default_is_auto_and_its_choice_is_logged(cores, monkeypatch, caplog):
    cores(2)
    monkeypatch.setattr(cli, "accelerator", lambda dev=None: None)
    monkeypatch.delenv("RA_WORKERS", raising=False)
    monkeypatch.delenv("RA_API_KEYS_FILE", raising=False)
    served = {}
    monkeypatch.setitem(sys.modules, "uvicorn", types.SimpleNamespace(run=lambda app, **kw: served.update(app=app)))
    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() exports its choices to the processes it starts
    with caplog.at_level(logging.INFO, logger="service"):
        assert cli.main(["--port", "0"]) == 0
    assert served["app"] == "service.boot:single_process_app"
    assert os.environ["RA_WORKERS"] == "1"
    assert "--workers auto: one process: 2 cores and no accelerator" in caplog.text
