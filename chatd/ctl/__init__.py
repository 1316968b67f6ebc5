"""`chatctl`: manage a running chatd over its control socket.  Imports chatd.wire only,
and the config module to find the socket named in chatd.yaml."""
