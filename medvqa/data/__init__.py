"""The datasets: readers of the official formats (`readers`), the built-in synthetic dataset (`synthetic`), tensors for training (`batches`)."""
