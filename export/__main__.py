"""`python -m sllm.export CHECKPOINT --out DIR`: the same as `sllm-export`."""
from sllm.export.cli import main

main()
