"""Tests of dexorder.gateway.llm."""
