"""Benchmarks that print figures (not timed tests): `python -m bench` / `sllm-bench` reproduces the
paper's Tables 1 and 3 on this machine (docs/bench.md). `decoder_step.py` and
`cloud_throughput.py` also run on their own as scripts."""
