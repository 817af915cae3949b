"""The cloud half of sllm: a gRPC service that runs the grafted OPT blocks over sentence
vectors, one KV cache per session, batching the steps of concurrent sessions.

Modules: config (limits), errors, wire checks live in protos.wire, engine (batched
forward over per-session KV caches), sessions (store, limits, eviction), batcher (the
model thread), service (the RPCs), auth, metrics, jsonlog, server (grpc server,
health, reflection, TLS, shutdown), cli (`sllm-cloud`)."""
