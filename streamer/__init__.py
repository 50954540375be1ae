"""Wire protocol, frame sources, sockets and the HDF5 session recorder."""
