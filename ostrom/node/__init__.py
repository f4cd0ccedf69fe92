"""The daemon: trio, libp2p, storage and the RPC server."""
