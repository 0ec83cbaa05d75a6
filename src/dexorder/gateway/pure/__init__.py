"""The gateway's pure logic: protocol frames, usage and conversation events, licenses,
model routing and message complexity, rate-limit arithmetic, risk figures and Telegram
formatting.

No I/O and nothing of the gateway's servers, stores or clients (an import-linter contract
holds it so): the rest of the gateway calls it with values it has read.
"""
