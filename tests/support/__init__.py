"""Helpers behind the fixtures in ``tests/conftest.py``: a Kafka client for tests, topics, the
per-test database, the engine as a real process and the contract's event factories."""
