"""Experiments beside the product: nothing in app/, model/ or scripts/ imports from here."""
