"""The agent's trading logic, pure: indicators, OHLCV series, strategies and backtests.

No I/O and nothing of the agent's server or stores (an import-linter contract holds it
so); the agent's tools call it on data they have loaded.
"""
