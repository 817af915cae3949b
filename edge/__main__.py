from sllm.edge.cli import main

main()
