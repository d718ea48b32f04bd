"""Per-clip descriptors beside the CNNs: openSMILE audio functionals and LBP-TOP face texture."""
