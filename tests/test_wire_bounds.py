"""The size bounds the server relies on to cut Execute answers into responses under 1 MiB: a
"light" result (no text, ranges or lists) is counted at LIGHT_RESULT_BYTES without measuring
it, so that bound must hold for the largest light result there can be, and every EventResult
field must be classified as light or heavy (a new field forces the decision)."""

from __future__ import annotations

from mtrremu.core.counters import COUNTER_NAMES, Counters
from mtrremu.core.ept import PopulateOutcome
from mtrremu.core.events import (
    AccessInfo,
    AccessKind,
    EventResult,
    Lookup,
    Mapping,
    PopulateInfo,
    WriteMsr,
)
from mtrremu.core.memtype import EptMemtype
from mtrremu.core.memtypes import MemType
from mtrremu.core.units import LEAF_LEVELS_DESCENDING, U64_MASK, Level
from mtrremu.rpc import convert
from mtrremu.v1 import emulator_pb2 as pb

U32_MASK = (1 << 32) - 1
LIGHT = {"op", "value", "access", "populate", "cd_toggled", "lookup", "vm_counters"}


def widest_counters() -> Counters:
    return Counters(**dict.fromkeys(COUNTER_NAMES, U64_MASK))


def test_every_event_result_field_is_light_or_heavy() -> None:
    fields = set(EventResult.__slots__) - {"own_counters"}  # the event's counters: fixed size
    assert fields == LIGHT | set(convert.HEAVY_FIELDS)
    assert not LIGHT & set(convert.HEAVY_FIELDS)


def test_the_largest_light_result_fits_its_bound() -> None:
    mapping = Mapping(Level.G1, U64_MASK & ~0xFFF, EptMemtype(MemType.WP, ipat=True))
    installed = dict.fromkeys(LEAF_LEVELS_DESCENDING, U64_MASK // 3)  # they sum to faults
    result = EventResult(
        WriteMsr(U32_MASK, U32_MASK, U64_MASK, True),
        value=U64_MASK,
        access=AccessInfo(AccessKind.FAULT, mapping, refault=True),
        populate=PopulateInfo(PopulateOutcome(installed, U64_MASK), U64_MASK, U64_MASK),
        cd_toggled=True,
        lookup=Lookup(mapping, zapped=True, mmio=True),
        vm_counters=widest_counters(),
        own_counters=widest_counters(),
    )
    assert {name for name in LIGHT if getattr(result, name)} == LIGHT  # every one set
    message = pb.OperationResult()
    bound = convert.fill_result(U32_MASK, result, message)
    assert bound == convert.LIGHT_RESULT_BYTES
    assert 512 < message.ByteSize() <= bound  # counted, not measured: it must not be more
    message.lane.vcpu, message.lane.index = U32_MASK, U32_MASK
    assert message.ByteSize() <= bound + convert.LANE_POSITION_BYTES


def test_a_heavy_result_is_measured() -> None:
    result = EventResult(WriteMsr(0, 0x2FF, 0, False), gp="x" * 5000)
    message = pb.OperationResult()
    assert convert.fill_result(0, result, message) == message.ByteSize() > 5000


def test_only_a_result_holding_nothing_is_bare() -> None:
    """Every field but the operation at its default is bare; any one field set is not."""
    op = WriteMsr(0, 0x2FF, 0, False)
    assert convert.is_bare(EventResult(op))
    assert not convert.is_bare(EventResult(op, cd_toggled=True))
    for name in set(EventResult.__slots__) - {"op", "cd_toggled"}:
        assert not convert.is_bare(EventResult(op, **{name: object()})), name  # type: ignore[arg-type]


def test_bare_runs_merge_into_exactly_what_filling_each_result_builds() -> None:
    """Prediction from protobuf's merge rule (repeated fields append): a run of ready-made
    pieces merged into a response that already holds results equals filling them one by one."""
    bare, other = EventResult(WriteMsr(0, 0x2FF, 0, False)), EventResult(WriteMsr(1, 0, 0, False))
    other.counters.guest_gp = 1
    pieces = convert.BareResults()
    merged, filled = pb.ExecuteResponse(batch_id=7), pb.ExecuteResponse(batch_id=7)
    for response in (merged, filled):
        convert.fill_result(0, other, response.results.add())
    merged.MergeFromString(pieces.run(1, 40))
    for entry in range(1, 40):
        convert.fill_result(entry, bare, filled.results.add())
    convert.fill_result(40, other, merged.results.add())
    convert.fill_result(40, other, filled.results.add())
    assert merged.SerializeToString() == filled.SerializeToString()
    assert [r.entry for r in merged.results] == list(range(41))
