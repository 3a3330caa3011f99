"""The one schedule spec parser: typing from the generator's signature, and errors that list the valid ones."""

from __future__ import annotations

import pytest

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules import SCHEDULES, generate
from bitpipe_fx.schedules.registry import option_types
from bitpipe_fx.schedules.spec import ScheduleSpec, make_spec, parse_spec, schedule_spec, split_specs


def test_values_are_typed_as_the_generator_declares():
    spec = parse_spec(" bitpipe:inflight=none, weight_fraction=0.25,forward=1")
    assert spec == ScheduleSpec("bitpipe", (("forward", 1), ("inflight", None), ("weight_fraction", 0.25)))
    assert parse_spec("bitpipe:inflight=2").kwargs() == {"inflight": 2}
    assert parse_spec("interleaved:chunks=3") == parse_spec("interleaved:chunks=3:") == make_spec("interleaved",
                                                                                                   {"chunks": 3})
    assert str(parse_spec("bitpipe:weight_fraction=0.25,inflight=none")) == "bitpipe:inflight=none,weight_fraction=0.25"
    assert parse_spec(str(spec)) == spec
    assert option_types("interleaved") == {"chunks": (int,)}
    assert option_types("gpipe") == {}


@pytest.mark.parametrize(("text", "message"), [
    ("interleaved:chunks=2.5", "option chunks of schedule 'interleaved' takes int, got '2.5'"),
    ("bitpipe:inflight=many", "option inflight of schedule 'bitpipe' takes int or None, got 'many'"),
    ("1f1b:chunks=2", "schedule '1f1b' has no option 'chunks'; it takes no options"),
    ("chimera:chunks=x", "schedule 'chimera' has no option 'chunks'; its options are forward (float), "
                         "backward (float)"),
    ("zbv:costs=1", "schedule 'zbv' has no option 'costs'; its options are defer_w (int or None)"),
    ("interleaved:chunks", "cannot read schedule option 'chunks' in 'interleaved:chunks'; write "
                           "NAME:key=value[,key=value]"),
    ("", "unknown schedule ''; choose one of " + ", ".join(sorted(SCHEDULES))),
])
def test_bad_specs_name_what_is_valid(text, message):
    with pytest.raises(ScheduleError) as info:
        parse_spec(text)
    assert str(info.value) == message


def test_generate_refuses_a_bad_option_instead_of_a_type_error():
    with pytest.raises(ScheduleError, match=r"^schedule 'interleaved' has no option 'chunkz'; its options are chunks"):
        generate("interleaved", 2, 4, chunkz=2)
    with pytest.raises(ScheduleError, match=r"^option chunks of schedule 'interleaved' takes int, got True$"):
        generate("interleaved", 2, 4, chunks=True)
    assert generate("bitpipe", 2, 4, forward=[1.0, 1.0, 1.0, 1.0]).stages == 4  # per-stage costs, from JSON


def test_keyword_options_merge_with_the_spec():
    assert schedule_spec("interleaved", {"chunks": 2}) == parse_spec("interleaved:chunks=2")
    assert schedule_spec("interleaved:chunks=2", {"chunks": 2}) == parse_spec("interleaved:chunks=2")
    with pytest.raises(ScheduleError, match="chunks is 2 in 'interleaved:chunks=2' but 4 as a keyword; give it once"):
        schedule_spec("interleaved:chunks=2", {"chunks": 4})


def test_a_list_of_specs_splits_at_names_not_at_option_commas():
    assert split_specs("gpipe, interleaved:chunks=2,bitpipe:inflight=1,weight_fraction=0.5,1f1b") == [
        "gpipe", "interleaved:chunks=2", "bitpipe:inflight=1,weight_fraction=0.5", "1f1b"]
