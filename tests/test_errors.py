"""The one exception tree (fusee.errors): every error a user can meet is a FuseeError with a
documented exit code, the old import locations still work, and the input errors say the
limit in one line."""

from __future__ import annotations

import inspect

import pytest

import fusee.config
import fusee.errors as errors
import fusee.index
import fusee.master.logic
import fusee.verbs
import fusee.master.link as master_link

from fusee.emulator.cluster import LocalCluster
from fusee.layout import CLASSES, object_bytes


def _classes():
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if c.__module__ == errors.__name__]


def test_every_error_is_a_documented_fusee_error_with_an_exit_code():
    tree = errors.__doc__.split("Each class")[0]
    for cls in _classes():
        assert issubclass(cls, errors.FuseeError), cls
        assert cls.exit_code in range(6), cls
        assert cls.__name__ in tree, f"{cls.__name__} is missing from the module doc's tree"
        if cls is not errors.FuseeError:
            assert cls.__doc__.startswith("Raised "), cls


def test_exit_codes_tell_the_cases_apart():
    assert errors.KeyNotFound.exit_code == errors.KeyExists.exit_code == 1
    for cls in (errors.WrongType, errors.KeyTooLarge, errors.ValueTooLarge, errors.ConfigError,
                errors.NotAuthorized, errors.ClientClosed, errors.ForkedClient):
        assert cls.exit_code == 2, cls
    for cls in (errors.NodeTimeout, errors.TransportError, errors.LeaseExpired,
                errors.MasterTimeout, errors.MasterBusy, errors.Stalled, errors.ClientLimit):
        assert cls.exit_code == 3, cls
    assert errors.CorruptObject.exit_code == errors.DataLost.exit_code == 4
    assert errors.FuseeError.exit_code == errors.RemoteAccessError.exit_code == 5


def test_the_old_import_locations_name_the_same_classes():
    assert fusee.verbs.TransportError is errors.TransportError
    assert fusee.verbs.NodeTimeout is errors.NodeTimeout
    assert fusee.verbs.RemoteAccessError is errors.RemoteAccessError
    assert fusee.verbs.EpochChanged is errors.EpochChanged
    assert fusee.verbs.ControlError is errors.ControlError
    assert fusee.master.logic.LeaseExpired is errors.LeaseExpired
    assert fusee.master.logic.LeaseError is errors.LeaseError
    assert fusee.master.logic.TransitionInProgress is errors.TransitionInProgress
    assert fusee.master.logic.DataLost is fusee.index.LostData is errors.DataLost
    assert master_link.MasterError is errors.MasterError
    assert master_link.MasterTimeout is errors.MasterTimeout
    assert fusee.config.ConfigError is errors.ConfigError
    # and the built-in bases that old handlers catch
    assert issubclass(errors.WrongType, TypeError)
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.ClientClosed, RuntimeError)
    assert issubclass(errors.KeyNotFound, KeyError)


@pytest.fixture(scope="module")
def kv():
    with LocalCluster(memnodes=3, transport="local", replication=2) as cluster:
        with cluster.client() as client:
            yield client


def test_wrong_types_are_fusee_errors_and_type_errors(kv):
    for call in (lambda: kv.put("text", b"v"), lambda: kv.put(b"k", "text"),
                 lambda: kv.get(3), lambda: kv.get_many([b"a", None])):
        with pytest.raises(errors.WrongType, match="bytes, got") as e:
            call()
        assert isinstance(e.value, TypeError) and e.value.exit_code == 2


@pytest.mark.parametrize("call, kind, says", [
    (lambda kv: kv.pipeline(depth=0), errors.InvalidArgument, "depth must be at least 1"),
    (lambda kv: kv.get_many([b"a"], depth="2"), errors.WrongType, "depth is an int"),
    (lambda kv: kv.get_many(None), errors.WrongType, "get_many takes an iterable of keys"),
    (lambda kv: kv.get_many(b"abc"), errors.WrongType, "get_many takes an iterable of keys"),
    (lambda kv: kv.put_many(None), errors.WrongType, "put_many takes a mapping or"),
    (lambda kv: kv.put_many([b"a"]), errors.WrongType, "pairs, got an item bytes"),
    (lambda kv: kv.put_many([(b"a", b"b", b"c")]), errors.WrongType, "got an item tuple"),
])
def test_bad_arguments_of_the_batch_api_are_fusee_errors_saying_which(kv, call, kind, says):
    """Python's own TypeError ('NoneType' object is not iterable, not enough values to
    unpack) names no argument and is no FuseeError, which the README promises every error
    is; nothing runs, nothing is written."""
    with pytest.raises(kind, match=says) as e:
        call(kv)
    assert isinstance(e.value, (TypeError, ValueError)) and e.value.exit_code == 2
    assert kv.get(b"a") is None


@pytest.mark.parametrize("client_id, kind, says", [
    (-1, errors.InvalidArgument, "client id -1 is out of range 0.."),
    (10 ** 9, errors.InvalidArgument, "out of range 0.."),
    ("3", errors.WrongType, "client_id is an int, got str"),
])
def test_a_client_id_out_of_range_or_of_the_wrong_type_says_so(client_id, kind, says):
    with LocalCluster(memnodes=3, transport="local", replication=2) as cluster:
        with pytest.raises(kind, match=says) as e:
            cluster.client(client_id=client_id)
        assert e.value.exit_code == 2


def test_the_empty_and_the_long_key_say_the_limit(kv):
    limit = kv.config.layout.max_key_size
    with pytest.raises(errors.KeyTooLarge) as e:
        kv.put(b"", b"v")
    assert str(e.value) == f"the empty key is not allowed: a key has 1 to {limit} bytes"
    with pytest.raises(errors.KeyTooLarge, match=f"a key has 1 to {limit} bytes"):
        kv.get(b"k" * (limit + 1))
    kv.put(b"k" * limit, b"longest key")
    assert kv.get(b"k" * limit) == b"longest key"


def test_an_oversized_value_says_how_large_a_value_may_be_with_that_key(kv):
    key = b"some key"
    largest = CLASSES[-1] * kv.config.layout.object_unit
    limit = largest - object_bytes(len(key), 0)
    kv.put(key, b"v" * limit)                            # the limit itself fits
    assert kv.get(key) == b"v" * limit
    with pytest.raises(errors.ValueTooLarge) as e:
        kv.put(key, b"v" * (limit + 1))
    assert str(e.value) == (f"a value of {limit + 1} bytes is too large: with this 8-byte key "
                            f"a value has at most {limit} bytes (objects are at most {largest} "
                            "bytes, header and log entry included)")
    assert "\n" not in str(e.value)


def test_a_batch_error_exits_with_the_highest_code_of_its_failures(kv):
    from fusee.batch import BatchError
    kv.put(b"present", b"v")
    with pytest.raises(BatchError) as e:
        kv.pipeline().delete(b"absent").get(b"present").execute()
    assert e.value.exit_code == 1
    assert BatchError([None, errors.KeyNotFound(b"k"), errors.NodeTimeout("x", 0)]).exit_code == 3
    assert BatchError([RuntimeError("a bug")]).exit_code == 5
