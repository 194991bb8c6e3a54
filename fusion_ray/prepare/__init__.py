"""Prepare: chat corpora → rendered text, sharded to Parquet (`stage`); reading corpora row by row (`corpus`)."""
