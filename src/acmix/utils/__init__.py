"""Leaf utilities with no dependency on the rest of acmix: argument checks, file I/O."""
