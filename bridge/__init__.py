"""webhook-bridge: MQTT to webhook edge daemon with a durable SQLite queue."""

__version__ = "0.1.0"
