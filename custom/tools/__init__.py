"""Commands around the bundle (``python -m custom``): pictures, packaging, benchmark. Nothing in the library
imports them."""
