"""TLS and mutual TLS between agents and the fusion node (certificates made here, for 127.0.0.1)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fusion import FusionConfig, FusionNode
from fusion.node import TlsConfig
from fusion.receive import expected_grid
from models.codec_train import load_codec
from models.detector import load_checkpoint
from transport import FeatureUplink, LinkError, TlsFiles, health_status

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    now = dt.datetime.now(dt.UTC)

    def make(name: str, issuer_key, issuer_name, *, ca: bool, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca_cert = make("cpstream test CA", None, None, ca=True)
    server_key, server_cert = make("fusion", ca_key, ca_cert.subject, ca=False,
                                   san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key, client_cert = make("agent 0", ca_key, ca_cert.subject, ca=False)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    pem = serialization.Encoding.PEM
    return {"ca": _write(folder / "ca.pem", ca_cert.public_bytes(pem)),
            "server_cert": _write(folder / "server.pem", server_cert.public_bytes(pem)),
            "server_key": _write(folder / "server.key", pem_key(server_key)),
            "client_cert": _write(folder / "client.pem", client_cert.public_bytes(pem)),
            "client_key": _write(folder / "client.key", pem_key(client_key))}


async def test_mutual_tls_admits_a_certified_agent_and_nobody_else(tmp_path: Path) -> None:
    files = _pki(tmp_path)
    detector, _ = load_checkpoint(ROOT / "models/checkpoints/mobiledet_tiny.pt")
    codec, _ = load_codec(ROOT / "models/checkpoints/codec_mobiledet_tiny.pt", detector.config)
    tls = TlsConfig(cert=files["server_cert"], key=files["server_key"], client_ca=files["ca"])
    node = FusionNode(FusionConfig(listen="127.0.0.1:0", tokens={0: "t0"}, tls=tls), detector, codec)
    server = await node.start()
    address = f"127.0.0.1:{server.port}"
    certified = TlsFiles(ca=files["ca"], cert=files["client_cert"], key=files["client_key"])
    try:
        assert await health_status(address, certified) == "SERVING"
        assert await health_status(address, TlsFiles(ca=files["ca"])) == "UNREACHABLE"  # no client certificate
        assert await health_status(address) == "UNREACHABLE"  # plain TCP is not spoken at all
        from tests.test_streaming import _raw_frame

        uplink = FeatureUplink(address, 0, "t0", certified)
        task = asyncio.create_task(uplink.run())
        uplink.offer(_raw_frame(0, 1, expected_grid(detector, None)))
        await asyncio.wait_for(uplink.connected.wait(), timeout=10)
        while node.agents.get(0) is None or node.agents[0].frames_received < 1:
            node._arrival.clear()
            await asyncio.wait_for(node._arrival.wait(), timeout=10)
        uplink.close()
        await asyncio.wait_for(task, timeout=10)
        impostor = FeatureUplink(address, 0, "stolen?", certified)  # a good certificate does not replace the token
        with pytest.raises(LinkError, match="wrong token for agent 0"):
            await asyncio.wait_for(impostor.run(), timeout=10)
    finally:
        await node.stop()
    assert node.agents[0].frames_received == 1


def test_missing_certificate_files_are_named() -> None:
    with pytest.raises(LinkError, match="TLS certificate /nonexistent/server.pem"):
        TlsFiles(cert=Path("/nonexistent/server.pem"), key=Path("/nonexistent/server.key")).server_credentials()
