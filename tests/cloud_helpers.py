"""Cloud test helpers: in-process servers, the torch reference of a step, raw Converse streams."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import torch

from cloud.config import ServerConfig
from cloud.server import CloudServer
from modeling.opt_graft import STOP, GraftedOPT
from protos.sllm.v1 import sllm_pb2 as pb

D = 32  # the random cloud model of the `cloud_bundle` fixture (tests/conftest.py)
MODEL_ID = "sllm-test-model"


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
    with torch.no_grad():
        h, logits = model(torch.as_tensor(np.asarray(vectors, dtype=np.float32))[None])
    p = logits[0].float().softmax(-1)[:, STOP].numpy()
    return h[0].float().numpy(), p, (logits[0].argmax(-1) == STOP).numpy()


def converse_raw(target: str, messages: list, metadata=(), timeout: float = 10.0, raw: bool = False,
                 credentials=None) -> tuple[list, object, str]:
    """Send `messages` on one Converse stream, then half-close. Returns (replies, status code, details).
    With raw=True, `messages` are bytes sent as they are."""
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
