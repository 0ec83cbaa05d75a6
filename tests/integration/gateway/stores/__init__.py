"""Tests of dexorder.gateway.stores."""
