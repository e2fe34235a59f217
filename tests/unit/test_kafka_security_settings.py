"""The Kafka security settings: parsed, checked against each other, and given to every client."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from consumer.settings import ENV_PREFIX, SettingsError, load_settings
from consumer.stream.kafka import kafka_client_options
from tests.support.tls import Certificates, make_certificates


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MILESTONES_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _set(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(ENV_PREFIX + name.upper(), value)


def test_plaintext_is_the_default_and_sends_no_credentials() -> None:
    options = kafka_client_options(load_settings())
    assert options["security_protocol"] == "PLAINTEXT"
    assert "sasl_plain_password" not in options
    assert "ssl_context" not in options


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_options_carry_mechanism_credentials_and_a_verifying_context(
    monkeypatch: pytest.MonkeyPatch, certificates: Certificates, mechanism: str
) -> None:
    _set(monkeypatch, kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism=mechanism,
         kafka_sasl_username="engine", kafka_sasl_password="s3cret",
         kafka_ssl_cafile=str(certificates.ca))
    settings = load_settings()
    assert "s3cret" not in repr(settings)  # a SecretStr
    options = kafka_client_options(settings)
    assert options["sasl_mechanism"] == mechanism
    assert options["sasl_plain_username"] == "engine"
    assert options["sasl_plain_password"] == "s3cret"
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_client_certificate_is_loaded(monkeypatch: pytest.MonkeyPatch, certificates: Certificates) -> None:
    _set(monkeypatch, kafka_security_protocol="SSL", kafka_ssl_cafile=str(certificates.ca),
         kafka_ssl_certfile=str(certificates.client_cert),
         kafka_ssl_keyfile=str(certificates.client_key))
    assert isinstance(kafka_client_options(load_settings())["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "KAFKA_SASL_USERNAME"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "u"},
         "KAFKA_SASL_PASSWORD"),
        ({"kafka_sasl_username": "u", "kafka_sasl_password": "hunter2-secret"}, "KAFKA_SASL_USERNAME"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "u",
          "kafka_sasl_password": "hunter2-secret", "kafka_ssl_cafile": "{ca}"}, "KAFKA_SSL_CAFILE"),
        ({"kafka_security_protocol": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI",
          "kafka_sasl_username": "u", "kafka_sasl_password": "hunter2-secret"}, "KAFKA_SASL_MECHANISM"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nonexistent/ca.pem"},
         "KAFKA_SSL_CAFILE"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "{not_pem}"}, "KAFKA_SSL_CAFILE"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "{key}"}, "KAFKA_SSL_CERTFILE"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_certfile": "{cert}",
          "kafka_ssl_keyfile": "{other_key}"}, "KAFKA_SSL_CERTFILE"),
    ],
)
def test_a_contradiction_names_the_variable_and_never_the_password(
    monkeypatch: pytest.MonkeyPatch, certificates: Certificates, tmp_path: Path,
    values: dict[str, str], named: str,
) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    files = {"ca": certificates.ca, "not_pem": not_pem, "key": certificates.client_key,
             "cert": certificates.client_cert, "other_key": certificates.server_key}
    _set(monkeypatch, **{name: value.format(**files) for name, value in values.items()})
    with pytest.raises(SettingsError) as error:
        load_settings()
    line = str(error.value)
    assert line.startswith(ENV_PREFIX + named), line
    assert "\n" not in line
    assert "hunter2" not in line
