"""Commands that measure and report (``python -m lowmem.tools.<name>``): the top layer, beside the CLI.

They may import any part of lowmem; nothing in the library imports them (tests/engine/test_layers.py).
"""
