"""docs/deploy/ and cloud/nginx.conf: the files for real clusters agree with the code. What can be
checked on this machine is checked: the shipped nginx.conf (TLS both ways) passes `nginx -t`, the Kubernetes manifests parse
and hash on the header the edge sends, and the commands the container image and the probes run are
real `sllm-cloud` options. Building the image and applying the manifests is not done here (no
container runtime, no Kubernetes): docs/deploy/README.md says so."""
import re
import shutil
import subprocess

import pytest
from helpers import ROOT
from typer.main import get_command

from sllm.cloud.cli import app as cloud_app
from sllm.cloud.balancer import SHIPPED_CONFIG, find_nginx
from sllm.cloud.server import SERVICE_NAME
from sllm.protos.client import SESSION_KEY_HEADER
from sllm.protos.errors import REASON_KEY
from sllm.protos.v1 import sllm_pb2 as pb

DEPLOY = ROOT / "docs" / "deploy"


def test_the_shipped_nginx_config_passes_nginx_t(tmp_path):
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("nginx is not installed (scripts/test.sh installs it where it runs as root with apt-get)")
    from cloud_helpers import self_signed_cert

    cert, key = self_signed_cert(tmp_path)
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in ("sllm.crt", "replicas-ca.crt"):
        shutil.copy(cert, tls / name)
    shutil.copy(key, tls / "sllm.key")
    text = SHIPPED_CONFIG.read_text()
    assert f"$http_{SESSION_KEY_HEADER.replace('-', '_')}" in text and "hash $sllm_route consistent" in text
    assert f"add_header {REASON_KEY} {pb.ErrorReason.Name(pb.NO_REPLICA)} always;" in text  # the edge's cue
    text = (text.replace("/etc/nginx/tls/", f"{tls}/").replace("/var/log/nginx/", f"{tmp_path}/")
            .replace("/run/", f"{tmp_path}/"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    r = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_kubernetes_manifests_parse_and_hash_on_the_edge_header():
    yaml = pytest.importorskip("yaml")
    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in (DEPLOY / "k8s").glob("*.yaml")}
    assert set(docs) == {"cloud.yaml", "envoy.yaml", "ingress-nginx.yaml"}
    kinds = {name: [d["kind"] for d in ds if d] for name, ds in docs.items()}
    assert kinds["cloud.yaml"] == ["Service", "Deployment", "PodDisruptionBudget"]
    service = docs["cloud.yaml"][0]
    assert service["spec"]["clusterIP"] == "None"  # headless: the balancer sees each pod
    envoy = yaml.safe_load(docs["envoy.yaml"][0]["data"]["envoy.yaml"])
    route = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["hash_policy"] == [{"header": {"header_name": SESSION_KEY_HEADER}}]
    cluster = envoy["static_resources"]["clusters"][0]
    assert cluster["lb_policy"] == "RING_HASH"
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == SERVICE_NAME
    annotations = docs["ingress-nginx.yaml"][0]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == \
        f"$http_{SESSION_KEY_HEADER.replace('-', '_')}"
    pod = docs["cloud.yaml"][1]["spec"]["template"]["spec"]
    probe = pod["containers"][0]["readinessProbe"]["exec"]["command"]
    _assert_options(probe[1], probe[2:])
    assert pod["terminationGracePeriodSeconds"] > 20  # the image's --grace


def test_the_container_image_runs_real_commands():
    text = (DEPLOY / "Containerfile").read_text()
    entry = re.search(r'ENTRYPOINT \[(.*?)\]', text, re.S).group(1)
    words = re.findall(r'"([^"]+)"', entry)
    assert words[:2] == ["sllm-cloud", "serve"]
    _assert_options("serve", words[2:])
    check = re.search(r"CMD (sllm-cloud health .*)", text).group(1).split()
    _assert_options("health", check[2:])


def _assert_options(command: str, words: list[str]) -> None:
    """Every --option in `words` is an option of `sllm-cloud <command>`."""
    click_command = get_command(cloud_app).commands[command]
    known = {opt for p in click_command.params for opt in p.opts}
    used = [w for w in words if w.startswith("--")]
    assert used and set(used) <= known, set(used) - known
