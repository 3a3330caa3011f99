"""Test aids (never imported by the package): ``toy`` (a hand-split toy model, a naive program),
``reference`` (non-pipelined reference runs, relative errors), ``cases`` (example models under the numerics
contract), ``workers`` (bodies of launched ranks, importable by spawned processes).
"""
