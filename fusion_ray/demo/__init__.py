"""Offline demo assets: a two-domain chat corpus and small cuts of real tokenizers."""
