from sllm.edge.command import main

main()
