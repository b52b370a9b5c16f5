"""The fault-injection suite: the real agent under kill -9, outages, slow and rejecting
receivers, broker restarts, full disks, quotas, device clock faults, power-cut
approximations, an OPC UA server refusing the agent's certificate and a Modbus device
answering exceptions then falling silent, judged by a ledger of its own
(``faults.ledger``; the OPC UA and Modbus simulators run in-process, ``faults.devices``).

``make faults`` (``python -m faults.run``) runs every scenario at full size and writes
``bench/faults.md`` (``--merge`` replaces only the scenarios run); ``tests/faults`` runs a
short tier of it in ``make test``. Never imported by the agent.
"""
