"""The edge client: the SentenceVAE in ONNX Runtime, the gRPC client, `edge-chat`.

No torch and no transformers anywhere in this package (a test imports every module with both
made unimportable). Modules:
    providers  ONNX Runtime execution provider, chosen deliberately (CUDA only when it really loads)
    sampling   greedy / temperature / top-k / top-p / seed, in numpy
    runtime    EdgeRuntime: verified bundle, segmenter, tokenizer, encoder, cached decoder loop
    chat       ChatSession: one cloud conversation, history vectors, rebuild after a lost session
    local      LocalServer: `sllm-cloud serve` on loopback for `edge-chat --local`
    cli        the `edge-chat` command
"""
