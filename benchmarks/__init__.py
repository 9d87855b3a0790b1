"""The benchmarks: scripts that measure pmnode and write their reports under docs/benchmarks/.

Run from the repository root as modules, `python -m benchmarks.<name>`; they are not part of the
wheel (a volunteer's node does not need them, nor matplotlib). `pmnode bench ...` (pmnode/bench) holds
the benchmarks that ship with the product."""
