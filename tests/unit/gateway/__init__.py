"""Tests of dexorder.gateway."""
