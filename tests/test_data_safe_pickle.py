"""safe_load_pickle: CIFAR-style pickles load, anything that would run code is refused."""
import io
import os
import pickle

import numpy as np
import pytest

from resforge.data.safe_pickle import UnsafePickleError, safe_load_pickle


class RunsShell:
    """Unpickling this with plain pickle would run a shell command creating `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_like_dict_roundtrip(tmp_path, protocol):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 7], b"data": data,
             b"filenames": [b"a.png", b"b.png"]}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    out = safe_load_pickle(path)
    assert set(out) == {"batch_label", "labels", "data", "filenames"}   # bytes keys -> str
    assert out["labels"] == [3, 7] and np.array_equal(out["data"], data)
    assert safe_load_pickle(io.BytesIO(path.read_bytes()))["labels"] == [3, 7]


def test_plain_containers_allowed():
    obj = {"s": {1, 2}, "f": frozenset({3}), "b": bytearray(b"x"), "t": (1, [2.5, None])}
    assert safe_load_pickle(io.BytesIO(pickle.dumps(obj, protocol=2))) == obj


def test_malicious_pickle_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": RunsShell(marker)}, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"system") as err:
        safe_load_pickle(io.BytesIO(payload), name="evil_batch")
    assert "evil_batch" in str(err.value) and "nothing was executed" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("target", [eval, getattr, pickle.loads, np.load])
def test_other_globals_refused(target):
    class Call:
        def __reduce__(self):
            return (target, ("1",))
    with pytest.raises(UnsafePickleError):
        safe_load_pickle(io.BytesIO(pickle.dumps(Call(), protocol=2)))


def test_garbage_is_a_clear_unpickling_error(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(pickle.UnpicklingError, match="junk"):
        safe_load_pickle(path)
