"""The fault-injection suite: the real agent under kill -9, outages, slow and rejecting
receivers, broker restarts, full disks, quotas, device clock faults and power-cut
approximations, judged by a ledger of its own (``faults.ledger``).

``make faults`` (``python -m faults.run``) runs every scenario at full size and writes
``bench/faults.md``; ``tests/faults`` runs a short tier of it in ``make test``. Never
imported by the agent.
"""
