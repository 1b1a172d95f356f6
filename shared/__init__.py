"""Code both planes use: settings, the snapshot model, key hashing, logging, generated protobuf code.

Depends on neither ``control_plane`` nor ``data_plane``.
"""

__version__ = "0.1.0"
