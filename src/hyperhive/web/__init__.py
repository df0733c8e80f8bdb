"""The web UIs: the operator's dashboard and each agent's own page, thin clients of the sockets."""
