"""The milestone engine: Kafka sessions in, milestone congratulations out, exactly once."""

__version__ = "0.1.0"
