"""Shared pytest set-up: the real-service fixtures of ``dexorder.devenv``."""

pytest_plugins = [
    "dexorder.devenv.fixtures_data",
    "dexorder.devenv.fixtures_kube",
    "dexorder.devenv.fixtures_helm",
]
