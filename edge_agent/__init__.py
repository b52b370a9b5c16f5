"""edge-agent: turns warehouse machine signals into durable, validated business events."""

__version__ = "0.1.0"
