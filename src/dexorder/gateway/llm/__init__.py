"""Calling models: the LLM adapter's events and litellm (``adapter``), the OpenAI wire
client (``wire``), the router over deployments (``routing``) and prices (``pricing``)."""
