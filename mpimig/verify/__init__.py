"""Verification workloads: the message storm under random migrations and the
seed campaigns that run it (``mpimig storm``). May import any part of mpimig.
"""
