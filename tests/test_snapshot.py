from __future__ import annotations

import dataclasses
import gc
import json

import pytest
import torch

import vramkit
from vramkit import DeviceMemoryDelta, InvalidArgumentError, MemoryDelta, MemorySnapshot, memory
from vramkit.devices import DeviceMemory, available_devices

_BYTE_FIELDS = [f.name for f in dataclasses.fields(DeviceMemory) if f.name != "device"]


def test_snapshot_reads_every_available_device() -> None:
    snap = vramkit.snapshot()
    assert isinstance(snap, MemorySnapshot)
    assert list(snap) == [str(d) for d in available_devices()]
    assert "cpu" in snap
    assert snap["cpu"].total_bytes is not None


def test_snapshot_is_frozen() -> None:
    snap = vramkit.snapshot("cpu")
    with pytest.raises(AttributeError):
        snap.wall_time = 0.0  # type: ignore[misc]


def test_snapshot_of_named_devices() -> None:
    assert list(vramkit.snapshot("cpu")) == ["cpu"]
    assert list(vramkit.snapshot(["cpu"])) == ["cpu"]
    with pytest.raises(InvalidArgumentError, match="at least one device"):
        vramkit.snapshot([])
    with pytest.raises(InvalidArgumentError, match="unknown device 'tpu'"):
        vramkit.snapshot("tpu")
    with pytest.raises(KeyError, match="this snapshot has cpu"):
        vramkit.snapshot("cpu")["cuda:0"]


def test_difference_of_snapshots_sees_a_real_allocation() -> None:
    before = vramkit.snapshot("cpu")
    block = torch.ones(128 * 1024**2, dtype=torch.uint8)
    after = vramkit.snapshot("cpu")
    delta = after - before
    assert isinstance(delta, MemoryDelta)
    assert delta == after.diff(before)
    change = delta["cpu"]
    assert isinstance(change, DeviceMemoryDelta)
    assert change.process_used_bytes is not None
    assert change.process_used_bytes >= 120 * 1024**2
    assert change.allocated_bytes is None  # unknown on cpu, not 0
    assert change.headline_bytes == change.process_used_bytes
    assert delta.seconds >= 0
    assert "process +1" in str(delta)  # +12x.x MiB
    del block


def test_delta_fields_are_none_where_either_side_is_none() -> None:
    a = DeviceMemory(device="x", allocated_bytes=10, used_bytes=None)
    b = DeviceMemory(device="x", allocated_bytes=4, used_bytes=7)
    change = DeviceMemoryDelta.between(b, a)
    assert change.allocated_bytes == 6
    assert change.used_bytes is None
    assert change.headline_bytes == 6


def test_a_delta_has_exactly_the_fields_of_a_reading() -> None:
    # One list of fields: a field added to DeviceMemory is in every difference too.
    assert [f.name for f in dataclasses.fields(DeviceMemoryDelta)] == [
        f.name for f in dataclasses.fields(DeviceMemory)
    ]
    reading = DeviceMemory("x", **dict.fromkeys(_BYTE_FIELDS, 5))
    change = DeviceMemoryDelta.between(DeviceMemory("x", **dict.fromkeys(_BYTE_FIELDS, 2)), reading)
    assert change.to_dict() == {"device": "x", **dict.fromkeys(_BYTE_FIELDS, 3)}
    assert change != DeviceMemory("x", **dict.fromkeys(_BYTE_FIELDS, 3))  # not a reading


@pytest.mark.parametrize(
    ("fields", "layer"),
    [
        ({"allocated_bytes": 1, "process_used_bytes": 2, "used_bytes": 3}, "allocated"),
        ({"process_used_bytes": 2, "used_bytes": 3}, "process"),  # the host
        ({"used_bytes": 3, "total_bytes": 9}, "used"),  # a driver that knows nothing finer
        ({"total_bytes": 9}, None),
    ],
)
def test_one_rule_says_which_layer_is_the_number(fields: dict[str, int], layer: str | None) -> None:
    reading = DeviceMemory("x", **fields)
    assert memory.usage_layer(reading) == layer
    change = DeviceMemoryDelta.between(DeviceMemory("x", **dict.fromkeys(fields, 0)), reading)
    assert change.headline_bytes == memory.layer_bytes(reading, layer)
    event = vramkit.events.Event(
        "load",
        "m",
        "x",
        "UNLOADED",
        "READY",
        memory_before=DeviceMemory("x", **dict.fromkeys(fields, 0)),
        memory_after=reading,
    )
    described = event.describe()
    assert (f"({layer} +" in described) is (layer is not None)


def test_what_a_load_added_passes_over_an_allocator_that_did_not_move() -> None:
    before = DeviceMemory("x", allocated_bytes=8, process_used_bytes=100, used_bytes=1000)
    onnx = DeviceMemory("x", allocated_bytes=8, process_used_bytes=164, used_bytes=1064)
    torch_load = DeviceMemory("x", allocated_bytes=40, process_used_bytes=164, used_bytes=1064)
    assert memory.grown_bytes(before, onnx) == 64  # an arena torch never saw
    assert memory.grown_bytes(before, torch_load) == 32
    assert memory.grown_bytes(torch_load, before) == 0  # never negative


def test_the_driver_layer_and_the_layers_worth_showing() -> None:
    host = DeviceMemory("cpu", process_used_bytes=2, used_bytes=3)
    board = DeviceMemory("board:0", used_bytes=3)
    gpu = DeviceMemory("cuda:0", allocated_bytes=1, used_bytes=3)
    assert memory.driver_layer(host) == "process"
    assert memory.driver_layer(gpu) == "used"
    # On the host the device-wide figure moves with every other process: left out.
    assert memory.shown_layers(host) == ("allocated", "reserved", "process")
    assert memory.shown_layers(board) == memory.shown_layers(gpu) == tuple(memory.LAYERS)
    assert memory.peak_bytes(DeviceMemory("x", allocated_bytes=1, peak_allocated_bytes=7)) == 7
    assert memory.peak_bytes(DeviceMemory("x", process_used_bytes=1, process_peak_bytes=5)) == 5
    assert memory.peak_bytes(board) is None
    assert DeviceMemoryDelta.between(gpu, board).freed() == {
        "allocated": None,
        "reserved": None,
        "process": None,
        "used": 0,
    }


def test_subtracting_something_else_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        vramkit.snapshot("cpu") - 3  # type: ignore[operator]


def test_str_is_one_line_per_device() -> None:
    snap = vramkit.snapshot()
    lines = str(snap).splitlines()
    assert len(lines) == len(snap)
    assert lines[0].startswith("cpu ")
    assert "GiB used (" in lines[0]
    assert "process " in lines[0]


def test_to_dict_is_json_ready() -> None:
    snap = vramkit.snapshot()
    data = json.loads(json.dumps(snap.to_dict()))
    assert data["devices"]["cpu"]["total_bytes"] == snap["cpu"].total_bytes
    delta = json.loads(json.dumps((vramkit.snapshot() - snap).to_dict()))
    assert "cpu" in delta["devices"]


def test_snapshot_walks_no_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    # What would make a snapshot cost milliseconds is a gc walk or collection;
    # benchmarks/bench_snapshot.py measures its time (tests cannot, on a busy host).
    vramkit.snapshot()

    def refuse(*args: object) -> None:
        raise AssertionError("snapshot() walked or collected the heap")

    for name in ("collect", "get_objects", "get_referrers"):
        monkeypatch.setattr(gc, name, refuse)
    for _ in range(3):
        vramkit.snapshot()
