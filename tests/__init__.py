"""The test suite; a package so that ``tests.support`` imports by name in spawned ranks too."""
