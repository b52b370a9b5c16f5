"""Connectors: speak one protocol each and turn device messages into DeviceEvents."""
