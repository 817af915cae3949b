"""`python -m sllm.export CHECKPOINT --out DIR` (the `export` script name is a shell builtin in bash/zsh)."""
from sllm.export.cli import app

app(prog_name="export")
