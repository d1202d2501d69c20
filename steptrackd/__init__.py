"""
steptrack: a step-ingestion daemon.

Devices stream step updates over a WebSocket; apps read each user's running
total over REST. The package is laid out in layers a reader can find by file
name:

- ``update``: what a valid update is, and the decoder that checks it;
- ``store``: where totals live (the store interface and its implementations);
- ``websocket``: the Autobahn adapter that feeds updates to a store;
- ``rest``: the Klein adapter that reads totals from a store;
- ``server``: the assembly of both adapters and a store into one service, and
  the programmatic API;
- ``tap``: the ``twistd steptrack`` command line.
"""

__version__ = "0.1.0"
