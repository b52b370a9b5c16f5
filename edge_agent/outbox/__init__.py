"""The durable outbox: business events and their deliveries, committed before any ack."""
