"""The control plane: REST API, storage, agent channel, web console."""
