"""The wire contract: committed stubs match the .proto, import paths work without torch,
and the vector codec checks every field."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sllm.protos.v1 import sllm_pb2 as pb
from sllm.protos.wire import WireError, pack, unpack

ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_are_fresh(tmp_path):
    subprocess.run([str(ROOT / "scripts/gen_protos.sh"), str(tmp_path)], check=True, cwd=ROOT,
                   env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    out = tmp_path / "sllm"  # the stubs are written under their module path, sllm/protos/...
    generated = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert Path("protos/v1/sllm_pb2.py") in generated and Path("protos/v1/sllm_pb2_grpc.py") in generated
    stale = [str(rel) for rel in generated if (ROOT / rel).read_bytes() != (out / rel).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run scripts/gen_protos.sh and commit the result"


def test_stubs_and_client_import_without_torch():
    code = ("import sys; import sllm.protos.v1.sllm_pb2_grpc, sllm.protos.client, sllm.protos.wire; "
            "assert 'torch' not in sys.modules, 'the edge client must not pull torch'; "
            "from sllm.protos.v1 import sllm_pb2 as pb; "
            "print(pb.DESCRIPTOR.package, pb.DESCRIPTOR.services_by_name['SentenceLM'].full_name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["sllm.v1", "sllm.v1.SentenceLM"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_pack_unpack_roundtrip(dtype):
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    msg = pack(x, dtype)
    assert (msg.count, msg.dim, len(msg.data)) == (3, 8, 3 * 8 * np.dtype(dtype).itemsize)
    np.testing.assert_array_equal(unpack(msg, dim=8), x.astype(dtype).astype(np.float32))
    assert unpack(pack(x[0]), dim=8).shape == (1, 8)  # one vector [d] -> count 1


@pytest.mark.parametrize("change,match", [
    (dict(dtype=pb.DTYPE_UNSPECIFIED), "dtype"),
    (dict(dtype=7), "dtype"),
    (dict(dim=0), "dim is 0"),
    (dict(dim=4), "d=8"),
    (dict(count=0), "count is 0"),
    (dict(count=2), "bytes"),
    (dict(data=b"\x00" * 5), "bytes"),
])
def test_unpack_rejects_inconsistent_messages(change, match):
    msg = pack(np.ones((3, 8), np.float32))
    for k, v in change.items():
        setattr(msg, k, v)
    with pytest.raises(WireError, match=match):
        unpack(msg, dim=8)


def test_unpack_rejects_nan_inf_and_huge_values():
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((2, 4), np.float32)
        x[1, 2] = bad
        with pytest.raises(WireError, match="NaN or Inf .*vector 1"):
            unpack(pack(x, check=False), dim=4)
        with pytest.raises(WireError, match="NaN or Inf"):  # the client refuses to send them at all
            pack(x)
    with pytest.raises(WireError, match="NaN or Inf"):  # 1e6 overflows float16 to inf
        unpack(pack(np.full((1, 4), 1e6), "float16", check=False), dim=4)
    with pytest.raises(WireError, match="float16"):
        pack(np.full((1, 4), 1e6), "float16")
    with pytest.raises(WireError, match="over the limit"):
        unpack(pack(np.full((1, 4), 1e5)), dim=4, max_abs=1e4)
    with pytest.raises(WireError):
        pack(np.zeros((0, 4)))
