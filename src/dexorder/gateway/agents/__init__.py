"""Users' agents: provisioning them, and the MCP client (``mcp_transport`` under
``mcp_client``) whose sessions the user's chats share (``sessions``)."""
