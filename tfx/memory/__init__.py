"""Memory attached to a model: the kNN-LM datastore (Khandelwal et al., 2020) in `knn` and `datastore`."""
