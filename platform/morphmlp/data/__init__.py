"""Video data: Parquet index → Ray Data decode on CPU actors → sampled, augmented uint8 clips."""
