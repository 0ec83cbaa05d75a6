"""Pure logic that two processes share (the operator and the gateway, or the gateway and
the agent): tiers, quantities, naming, the UserAgent contract and its manifests.

Logic only one process uses lives in that process's own pure subpackage
(``dexorder.gateway.pure``, ``dexorder.agent.trading``).
"""
