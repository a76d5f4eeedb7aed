"""One small file per training stage: the loss, the batch layout and where its data comes from."""
