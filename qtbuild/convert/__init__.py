"""The convert pipeline: image → flattened tree → ramdisks → EIF, with measurements."""
