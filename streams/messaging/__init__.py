"""Kafka topics, and the producer SDK that applications publish usage events with."""
