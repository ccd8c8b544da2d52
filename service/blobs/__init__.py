"""Blobs in the store and their references: what the retention sweep may delete."""
