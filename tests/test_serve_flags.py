"""``fedrecon serve`` checks every flag before it opens the store (issue 10, point 9): a mistyped TLS file,
a busy port or a bad limit exits 2 with a message, and the store is never touched (here: never created)."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from fedrecon.cli import app

TASK = """
name = "flags"
[model]
kind = "matrix_factorization"
num_items = 6
num_factors = 2
"""


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "task.toml").write_text(TASK)
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n"
                                          "-----END CERTIFICATE-----\n")
    cert, key = _self_signed(tmp_path, "server")
    _, other_key = _self_signed(tmp_path, "other")
    return {"task": tmp_path / "task.toml", "cert": cert, "key": key, "other_key": other_key,
            "garbage": tmp_path / "garbage.pem", "missing": tmp_path / "missing.pem"}


CASES = {
    "missing certificate": (["--tls-cert", "{missing}", "--tls-key", "{key}"], "cannot use TLS certificate"),
    "certificate not PEM": (["--tls-cert", "{garbage}", "--tls-key", "{key}"], "cannot use TLS certificate"),
    "key of another certificate": (["--tls-cert", "{cert}", "--tls-key", "{other_key}"],
                                   "cannot use TLS certificate"),
    "client CA not PEM": (["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-client-ca", "{garbage}"],
                          "cannot use client CA"),
    "key without certificate": (["--tls-key", "{key}"], "TLS needs both"),
    "zero first-message budget": (["--first-message-s", "0"], "first-message-s"),
    "no stream per credential": (["--max-streams-per-credential", "0"], "max-streams-per-credential"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_flag_exits_2_before_the_store_is_opened(files: dict[str, Path], tmp_path: Path,
                                                       case: str) -> None:
    args, expected = CASES[case]
    db = tmp_path / "store.db"
    result = CliRunner().invoke(app, ["serve", "--task", str(files["task"]), "--store", f"sqlite:///{db}",
                                      "--port", "0", *(a.format(**files) for a in args)])
    assert result.exit_code == 2, result.output
    # The reason in one line on stderr (a flag outside its range is a usage error: click's "Usage:" lines
    # come before it), never a traceback.
    assert len([line for line in result.stderr.splitlines() if expected in line]) == 1, result.output
    assert "Traceback" not in result.output and result.stdout == "" and not db.exists()


def test_a_port_in_use_exits_2_before_the_store_is_opened(files: dict[str, Path], tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--task", str(files["task"]), "--store", f"sqlite:///{db}",
                                          "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not db.exists()
