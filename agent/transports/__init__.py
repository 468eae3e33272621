"""Transports: where audio comes from and events go to. One file (or package) each."""
