"""The ServerApp side: the training and forgetting drivers, evaluation and run files."""
