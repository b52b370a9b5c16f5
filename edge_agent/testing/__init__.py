"""Test helpers that ship with the agent: fakes, the contract checks every sink (and, later,
every connector) must pass, and realistic sample data. Nothing here is used at runtime.
"""

from .sink_contract import ReceivedEvent, check_sink_contract, sample_items

__all__ = ["ReceivedEvent", "check_sink_contract", "sample_items"]
