"""`python -m export CHECKPOINT --out DIR` (the `export` script name is a shell builtin in bash/zsh)."""
from export.cli import app

app(prog_name="export")
