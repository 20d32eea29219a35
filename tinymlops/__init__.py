"""tinymlops core: settings, schemas, errors, MQTT plumbing and the command line."""

__version__ = "0.1.0"
