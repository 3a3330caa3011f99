"""The one dependency rule: needs, provides and dependents agree with each other and with the comm derivation."""

from __future__ import annotations

import pytest

from bitpipe_fx.schedules import Action, consumed_value, generate, produced_value
from bitpipe_fx.schedules.deps import dependents, describe, needs, provides

PROGRAMS = [("1f1b", 4, 6, {}), ("interleaved", 2, 4, {"chunks": 3}), ("zbv", 3, 5, {}),
            ("dualpipev", 2, 5, {}), ("chimera", 4, 4, {}), ("bitpipe", 4, 8, {})]


@pytest.mark.parametrize(("name", "devices", "n", "options"), [p for p in PROGRAMS if p[0] != "dualpipev"])
def test_dependents_is_the_inverse_of_needs(name, devices, n, options):
    """On programs whose backwards are all B or all I+W (dualpipev mixes them, so it has no one ``split``)."""
    program = generate(name, devices, n, **options)
    actions = {a for acts in program.device_actions for a in acts if a.kind != "SYNC"}
    split = program.split_backward
    by_needs = {(key, a) for a in actions for key in needs(a, program.stages)}
    by_dependents = {(key, c) for a in actions for key in provides(a) for c in dependents(key, program.stages, split)}
    assert by_needs == by_dependents
    producers = {}
    for a in actions:
        for key in provides(a):
            assert key not in producers, f"{key} provided by {producers.get(key)} and {a}"
            producers[key] = a
    assert all(key in producers for key, _ in by_needs)  # every need is some action's result


def test_rule_per_kind():
    s = 4
    assert needs(Action("F", 1, 0, 2), s) == ()
    assert needs(Action("F", 1, 2, 2), s) == (("F", 1, 1, 2),)
    assert needs(Action("B", 0, 3, 5), s) == (("F", 0, 3, 5),)  # the last stage starts from its own loss
    assert needs(Action("I", 0, 1, 5), s) == (("F", 0, 1, 5), ("B/I", 0, 2, 5))
    assert needs(Action("W", 0, 1, 5), s) == (("B/I", 0, 1, 5),)
    assert needs(Action("SYNC", 0, 1), s) == provides(Action("SYNC", 0, 1)) == ()
    assert provides(Action("B", 0, 1, 5)) == (("B/I", 0, 1, 5), ("W", 0, 1, 5))
    assert dependents(("F", 0, 3, 5), s, split=False) == (Action("B", 0, 3, 5),)
    assert dependents(("B/I", 0, 0, 5), s, split=True) == (Action("W", 0, 0, 5),)
    assert [describe(k) for k in provides(Action("B", 0, 1, 5))] == ["B/I0.1.5", "B/W0.1.5"]


@pytest.mark.parametrize(("name", "devices", "n", "options"), PROGRAMS)
def test_comm_values_are_the_cross_chunk_needs(name, devices, n, options):
    """consumed_value names exactly the need on another stage; produced_value the matching hand-off."""
    program = generate(name, devices, n, **options)
    for a in (a for acts in program.device_actions for a in acts):
        cross = [k for k in needs(a, program.stages) if k[2] != a.stage]
        value = consumed_value(program, a)
        if not cross:
            assert value is None
            continue
        (key,) = cross
        assert (value.pipe, value.stage, value.microbatch) == key[1:]
        assert value.kind == {"F": "act", "B/I": "grad"}[key[0]]
        place = program.placement
        assert (value.src, value.dst) == (place.device(key[1], key[2]), place.device(a.pipe, a.stage))
        producer = next(b for acts in program.device_actions for b in acts if key in provides(b))
        assert produced_value(program, producer) == value
