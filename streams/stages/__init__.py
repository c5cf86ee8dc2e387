"""Stages 1-4, as plain functions and objects: no Kafka client, no database."""
