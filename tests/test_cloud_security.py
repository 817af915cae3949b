"""Bearer-token auth (missing / wrong / malformed tokens rejected, health stays open) and TLS
with a self-signed certificate made here."""

import grpc
import numpy as np
import pytest
from cloud_helpers import MODEL_ID, D, converse_raw, reference_outputs, running_server, self_signed_cert
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sllm.protos.client import CloudClient, CloudError
from sllm.protos.v1 import sllm_pb2 as pb

TOKENS = ["s3cret-token", "rotated-token"]


def _vec(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def test_bearer_token_auth(cloud_bundle):
    with running_server(cloud_bundle, tokens=TOKENS) as srv:
        target = f"127.0.0.1:{srv.port}"
        for token in (None, "wrong", "s3cret-token-but-longer", "s3cret"):
            with CloudClient(target, token=token) as c:
                with pytest.raises(CloudError) as e:
                    c.model_info()
                assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(CloudError) as e:
                    c.conversation(MODEL_ID, D)
                assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert _details(target, ()) == "missing 'authorization: Bearer <token>' metadata"
        assert _details(target, (("authorization", "Basic czNjcmV0"),)).startswith("the authorization metadata must")
        assert _details(target, (("authorization", "Bearer nope"),)) == "invalid bearer token"
        for token in TOKENS:  # every configured token works (rotation)
            with CloudClient(target, token=token) as c, c.conversation(MODEL_ID, D) as conv:
                assert conv.append(_vec(2)).hidden.shape == (D,)
        with grpc.insecure_channel(target) as ch:  # health checking needs no token (load balancers)
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with CloudClient(target, token=TOKENS[0]) as c:
            assert c.stats().errors_by_code["UNAUTHENTICATED"] == 8 + 3


def _details(target, metadata) -> str:
    _, code, details = converse_raw(target, [pb.ClientMessage(open=pb.Open(model_id=MODEL_ID, dim=D))],
                                    metadata=metadata)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    return details


def test_tls_with_a_self_signed_certificate(cloud_bundle, cloud_model, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    v = _vec(4, seed=1)
    h = reference_outputs(cloud_model, v)[0]
    with running_server(cloud_bundle, tokens=TOKENS, tls_cert=str(cert), tls_key=str(key)) as srv:
        target = f"127.0.0.1:{srv.port}"
        with CloudClient(target, token=TOKENS[0], root_certificates=cert.read_bytes()) as c:
            with c.conversation(MODEL_ID, D) as conv:
                np.testing.assert_allclose(conv.append(v[:3]).hidden, h[2], atol=1e-5, rtol=0)
                np.testing.assert_allclose(conv.append(v[3]).hidden, h[3], atol=1e-5, rtol=0)
        with CloudClient(f"localhost:{srv.port}", token=TOKENS[0], root_certificates=cert.read_bytes()) as c:
            assert c.model_info(timeout=5).model_id == MODEL_ID  # the DNS name in the certificate works too
        with CloudClient(target, token="wrong", root_certificates=cert.read_bytes()) as c:
            with pytest.raises(CloudError) as e:  # TLS does not replace the token
                c.model_info(timeout=5)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with CloudClient(target, token=TOKENS[0]) as c:  # plaintext client against a TLS port
            with pytest.raises(CloudError) as e:
                c.model_info(timeout=5)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
        (tmp_path / "other").mkdir()
        other_cert, _ = self_signed_cert(tmp_path / "other")
        with CloudClient(target, token=TOKENS[0], root_certificates=other_cert.read_bytes()) as c:
            with pytest.raises(CloudError) as e:  # a certificate the client does not trust
                c.model_info(timeout=5)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
