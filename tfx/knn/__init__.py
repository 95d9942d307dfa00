"""kNN-LM (Khandelwal et al., 2020): the keys a model gives (`keys`), the datastore and its faiss index
(`datastore`), and the interpolated distribution, its tuning and sampling (`scoring`)."""
