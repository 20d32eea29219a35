"""The bottom layer: pure types, names and functions shared by every side of the system.

Nothing here imports the project; only the standard library and numpy. Topic names, event
payloads and other wire contracts live here once, and everything above imports them.
"""
