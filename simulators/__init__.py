"""Stand-in equipment and consumers for tests and the demo.

Each module is one simulator with its own CLI (`python -m simulators.NAME`). Simulators know
the protocols and the ground truth; they never import `edge_agent`, so they can judge it.
"""
