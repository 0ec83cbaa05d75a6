"""Stateful workflows that wait for people: the strategy review."""
