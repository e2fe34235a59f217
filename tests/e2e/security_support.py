"""A secured broker for the security tests: the embedded Tansu behind the SASL gateway and,
for TLS, behind stunnel; clients reach it only through the secured port it advertises."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumer.settings import Settings
from consumer.stream.kafka import kafka_client_options
from devstack.broker import start_broker
from devstack.processes import free_port
from tests.support.kafka import KafkaHelper
from tests.support.sasl_gateway import SaslGateway
from tests.support.tls import Certificates, stunnel

USER = "milestone-engine"


@dataclass(frozen=True)
class SecuredBroker:
    port: int
    tls: bool
    password: str
    certificates: Certificates

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(
        self, mechanism: str = "SCRAM-SHA-512", *, password: str | None = None,
        cafile: Path | None = None, client_cert: bool = False,
    ) -> dict[str, str]:
        """The engine's ``MILESTONES_KAFKA_*`` variables for this broker."""
        env = {
            "MILESTONES_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "MILESTONES_KAFKA_SECURITY_PROTOCOL": "SASL_SSL" if self.tls else "SASL_PLAINTEXT",
            "MILESTONES_KAFKA_SASL_MECHANISM": mechanism,
            "MILESTONES_KAFKA_SASL_USERNAME": USER,
            "MILESTONES_KAFKA_SASL_PASSWORD": password if password is not None else self.password,
        }
        if self.tls:
            env["MILESTONES_KAFKA_SSL_CAFILE"] = str(cafile or self.certificates.ca)
        if client_cert:
            env["MILESTONES_KAFKA_SSL_CERTFILE"] = str(self.certificates.client_cert)
            env["MILESTONES_KAFKA_SSL_KEYFILE"] = str(self.certificates.client_key)
        return env

    def client_options(self, **env_options: Any) -> dict[str, Any]:
        """aiokafka options for the test's own clients, built by the engine's factory."""
        env = self.env(**env_options)
        fields = {name.removeprefix("MILESTONES_").lower(): value for name, value in env.items()}
        options = kafka_client_options(Settings(**fields))
        options.pop("bootstrap_servers")
        return options

    def helper(self, **env_options: Any) -> KafkaHelper:
        return KafkaHelper(self.bootstrap_servers, self.client_options(**env_options))


@contextlib.asynccontextmanager
async def secured_broker(
    certificates: Certificates, workdir: Path, *, tls: bool, require_client_cert: bool = False,
    mechanisms: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
) -> AsyncIterator[SecuredBroker]:
    """Tansu on a private port; the gateway checks logins in front of it; stunnel (``tls``)
    in front of the gateway. The broker advertises the outermost port."""
    password = "kafka-" + secrets.token_hex(12)
    upstream = free_port()
    gateway = SaslGateway(upstream, {USER: password}, mechanisms)
    await gateway.start()
    try:
        with contextlib.ExitStack() as stack:
            public = gateway.port
            if tls:
                public = stack.enter_context(stunnel(
                    certificates, connect_port=gateway.port, workdir=workdir,
                    require_client_cert=require_client_cert,
                ))
            broker = start_broker(port=upstream, advertised_port=public)
            stack.callback(broker.stop)
            yield SecuredBroker(public, tls, password, certificates)
    finally:
        await gateway.close()


def all_outputs(texts: Mapping[str, str]) -> str:
    return "\n".join(f"--- {name}\n{text}" for name, text in texts.items())
