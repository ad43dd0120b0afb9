"""Devices as users write them, and the CPU thread count every command runs with."""
import pytest
import torch

from resforge.training import device as D
from resforge.training.device_names import parse_device


@pytest.mark.parametrize("text, names", [
    ("auto", ("auto",)), ("CPU", ("cpu",)), ("mps", ("mps",)), ("cuda", ("cuda",)), (0, ("cuda:0",)),
    ("0", ("cuda:0",)), ("cuda:1", ("cuda:1",)), ("0,1", ("cuda:0", "cuda:1")), (" 0, 1 ", ("cuda:0", "cuda:1")),
])
def test_device_forms(text, names):
    assert parse_device(text) == names


@pytest.mark.parametrize("text", ["banana", "", "gpu", "cuda:", "cuda:-1", "-1", "0,,1", "cuda:0:1", "٣"])
def test_bad_device_strings_list_the_accepted_forms(text):
    with pytest.raises(ValueError, match="is not one of auto, cpu, mps, cuda, cuda:N"):
        parse_device(text)


def test_cpu_runtime_describes_its_threads():
    rt = D.make_runtime("cpu", "fp32", True, threads=1)
    assert rt.device.type == "cpu" and rt.threads == 1 == torch.get_num_threads()
    assert rt.describe() == "cpu fp32 channels_last, 1 CPU thread"


@pytest.fixture
def machine(monkeypatch):
    """A fake 2-core machine whose load we set; torch's own thread count is restored after."""
    before = torch.get_num_threads()
    state = {"busy": 0.0}
    monkeypatch.setattr(D, "usable_cores", lambda: 2)
    monkeypatch.setattr(D, "busy_cores", lambda: state["busy"])
    monkeypatch.setattr(D, "_ceiling", None)
    monkeypatch.setattr(D, "_last_set", None)
    monkeypatch.delenv("RESFORGE_THREADS", raising=False)
    torch.set_num_threads(2)
    yield state
    torch.set_num_threads(before)


def test_auto_threads_leave_busy_cores_alone(machine, monkeypatch):
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    assert D.apply_threads(None) == 2                     # idle: every core
    machine["busy"] = 1.1                                 # another CPU-bound process
    assert D.apply_threads(None) == 1 == torch.get_num_threads()
    machine["busy"] = 0.2                                 # it left: back up to the ceiling, not beyond
    assert D.apply_threads(None) == 2
    machine["busy"] = 5.0
    assert D.apply_threads(None) == 1                     # never below one
    assert D.apply_threads(2) == 2                        # an explicit count wins


def test_auto_threads_respect_a_callers_setting_and_the_environment(machine, monkeypatch):
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    torch.set_num_threads(1)                              # e.g. the degradation experiment's per-job share
    assert D.apply_threads(None) == 1
    monkeypatch.setenv("RESFORGE_THREADS", "2")
    assert D.choose_threads(None) == 2
    monkeypatch.setenv("RESFORGE_THREADS", "two")
    with pytest.raises(ValueError, match="RESFORGE_THREADS='two'"):
        D.choose_threads(None)
    with pytest.raises(ValueError, match="threads=0"):
        D.choose_threads(0)


def test_deterministic_mode_keeps_a_fixed_thread_count(machine, monkeypatch):
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    machine["busy"] = 1.5
    assert D.choose_threads(None) == 2


def test_usable_cores_and_busy_cores_are_sane():
    assert D.usable_cores() >= 1 and D.busy_cores() >= 0
