"""The baseline of the sync-execute benchmark: a plain Django view doing the SQL the product's
sync path does at minimum."""
