"""Random cloud bundles and in-process servers, for tests, benchmarks and demos
(no training needed: the wire, batching and limits do not care what the weights are)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from transformers import OPTForCausalLM

from cloud.config import ServerConfig
from cloud.server import CloudServer
from training.config import OPTSpec
from training.models.opt_graft import GraftedOPT, opt_config_from_spec


def random_grafted_opt(d: int = 32, layers: int = 2, heads: int = 4, ffn_dim: int | None = None,
                       max_sentences: int = 64, seed: int = 0) -> GraftedOPT:
    torch.manual_seed(seed)
    cfg = opt_config_from_spec(OPTSpec(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                       ffn_dim=ffn_dim or 4 * d, max_position_embeddings=max_sentences),
                               vocab_size=16)
    cfg._attn_implementation = "eager"
    opt = GraftedOPT.from_causal_lm(OPTForCausalLM(cfg)).eval()
    with torch.no_grad():  # a stop head that says "stop" now and then, so both answers get exercised
        opt.stop_head.weight.normal_(0, 1.0 / d ** 0.5)
    return opt


def write_random_bundle(out_dir: str | Path, model_id: str = "sllm-test-model", **kwargs) -> dict:
    from export.cloud_bundle import write_cloud_bundle

    return write_cloud_bundle(random_grafted_opt(**kwargs), Path(out_dir), model_id)


@contextlib.contextmanager
def running_server(bundle_dir: str | Path, **config) -> Iterator[CloudServer]:
    """A started server on 127.0.0.1 (port 0 unless given), stopped (grace 0) on exit."""
    config.setdefault("port", 0)
    server = CloudServer.from_bundle(bundle_dir, ServerConfig(**config))
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=0)


def reference_outputs(model: GraftedOPT, vectors) -> tuple:
    """The torch reference: one full forward over all `vectors` [N, d] ->
    (hidden [N, d], P(stop) [N], stop decision [N]) as numpy."""
    import numpy as np

    from training.models.opt_graft import STOP

    with torch.no_grad():
        h, logits = model(torch.as_tensor(np.asarray(vectors, dtype=np.float32))[None])
    p = logits[0].float().softmax(-1)[:, STOP].numpy()
    return h[0].float().numpy(), p, (logits[0].argmax(-1) == STOP).numpy()


def converse_raw(target: str, messages: list, metadata=(), timeout: float = 10.0, raw: bool = False,
                 credentials=None) -> tuple[list, object, str]:
    """Send `messages` on one Converse stream, then half-close. Returns (replies, status code, details).
    With raw=True, `messages` are bytes sent as they are."""
    import grpc

    from protos.sllm.v1 import sllm_pb2 as pb

    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    try:
        call = channel.stream_stream(
            "/sllm.v1.SentenceLM/Converse",
            request_serializer=None if raw else pb.ClientMessage.SerializeToString,
            response_deserializer=pb.ServerMessage.FromString)(iter(messages), timeout=timeout, metadata=metadata)
        replies = []
        try:
            for reply in call:
                replies.append(reply)
        except grpc.RpcError as e:
            return replies, e.code(), e.details() or ""
        return replies, call.code(), call.details() or ""
    finally:
        channel.close()
