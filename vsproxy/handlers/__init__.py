"""HTTP and WebSocket handlers: thin adapters; each module ends with its `routes` list."""
