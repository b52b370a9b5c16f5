"""Sinks: deliver committed business events to one destination each (HTTP, MQTT)."""
