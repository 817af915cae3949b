"""Benchmarks that print figures (not timed tests), run from a checkout (not installed): `python -m bench`
reproduces the paper's Tables 1 and 3 on this machine (docs/bench.md); `python -m bench.<name>` runs one
of the others on its own. They measure the product through its own parts, wrapped where a run needs
something a chat does not (bench.sllm_loop.PastStop), never through hooks in the product."""
