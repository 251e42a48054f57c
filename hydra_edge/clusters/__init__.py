"""The data's clusters: found before training (TF-IDF, LSA, k-means) and routed to at inference."""
