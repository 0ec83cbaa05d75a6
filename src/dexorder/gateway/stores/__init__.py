"""What the gateway keeps outside its process: chat sessions (Redis), limits, licenses and
usage."""
