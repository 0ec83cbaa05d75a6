"""Tests of dexorder.gateway.agents."""
