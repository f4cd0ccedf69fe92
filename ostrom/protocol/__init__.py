"""The sans-IO core: records, codecs and rules as pure functions and state machines.

Nothing here performs I/O, reads a clock, or imports trio, sockets, sqlite or libp2p;
the current time is always an argument.
"""
